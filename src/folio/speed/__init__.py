"""Speed: faster kernels of the plain model's math, and the measurements that choose them.

Every piece works as a transformation of a plain `GPT` (model/gpt.py): `kernels.apply` swaps
its dropout, attention and loss modules, `packed.decoding_copy` makes a copy for decoding;
`training` and `decoding` measure which transformation is fastest on this machine
(`autotune`), and `bench` compares whole training paths (`folio bench`); `noinit`
builds a model for loading without the random initialisation it would throw away.
"""
