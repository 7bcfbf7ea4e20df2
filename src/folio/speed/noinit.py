"""Build modules without their random initialisation, for weights that are assigned next.

On the meta device PyTorch runs `normal_` / `uniform_` through its Python reference kernels,
whose first call imports torch._dynamo (~2 s of a `folio sample` start-up); the values are
thrown away anyway, so the `torch.nn.init` calls are skipped instead.
"""

from __future__ import annotations

from typing import Any

from torch.overrides import TorchFunctionMode


class no_init(TorchFunctionMode):  # noqa: N801 (used like a function: `with no_init():`)
    """Within the block, `torch.nn.init.*` functions return their tensor untouched."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))
