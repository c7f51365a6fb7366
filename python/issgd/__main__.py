from issgd.cli import main

main()
