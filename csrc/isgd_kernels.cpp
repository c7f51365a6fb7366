// The extension module itself is empty: every op is registered with the PyTorch dispatcher by the
// TORCH_LIBRARY_* blocks in the other translation units, which run when this library is loaded.
// `import isgd_kernels._C` is therefore all Python needs to do (the extension-cpp pattern).
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",   // name
      nullptr, // doc
      -1,     // per-interpreter state size
      nullptr, // methods
  };
  return PyModule_Create(&module_def);
}
}
