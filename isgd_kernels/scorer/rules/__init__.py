"""The built-in exact rules, one module per layer family; importing this package registers them all.

| module       | layers                                                         |
|--------------|----------------------------------------------------------------|
| linear.py    | nn.Linear                                                      |
| conv.py      | nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d                      |
| embedding.py | nn.Embedding, nn.EmbeddingBag                                  |
| norm.py      | LayerNorm, RMSNorm, GroupNorm, InstanceNorm, BatchNorm (eval), |
|              | PReLU                                                          |
| recurrent.py | nn.RNN, nn.LSTM, nn.GRU                                        |
"""
from isgd_kernels.scorer.rules import conv, embedding, linear, norm, recurrent  # noqa: F401  (each registers itself)
