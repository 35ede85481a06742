"""Payload pickling for process workers: cloudpickle that keeps functions' file names.

``_processpool.ProcessPool.submit`` pickles each attempt's call with ``dumps_payload``
(out-of-band buffers go to ``_shm``); the worker (``_worker``) unpickles it.
"""

from __future__ import annotations

import pickle
from typing import Any

_pickler_class: Any = None


def dumps_payload(obj: Any, buffer_callback: Any = None) -> bytes:
    """Pickle ``obj`` with cloudpickle, keeping the file names of functions pickled by value.

    ``buffer_callback`` receives the out-of-band buffers (pickle protocol 5).

    cloudpickle writes ``co_filename = "<dynamic-code>"`` for every function it pickles by
    value (those of ``__main__`` and notebooks), to make its output deterministic; worker
    tracebacks then say ``File "<dynamic-code>"`` and show no source line (issue 22 item
    10). A payload only needs to be faithful, so the real file name is kept.
    """
    global _pickler_class
    import io
    if _pickler_class is None:
        import types
        from collections import ChainMap

        import cloudpickle
        base = cloudpickle.Pickler
        code_reduce = base.dispatch_table[types.CodeType]

        def reduce_code(code: types.CodeType) -> Any:
            rebuild, args = code_reduce(code)
            return rebuild, tuple(code.co_filename if a == "<dynamic-code>" else a
                                  for a in args)

        _pickler_class = type("_PayloadPickler", (base,), {
            "dispatch_table": ChainMap({types.CodeType: reduce_code}, base.dispatch_table)})
    buf = io.BytesIO()
    _pickler_class(buf, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return buf.getvalue()
