"""Several threads on one model: what each sees, and who may change it when.

**Views.** ``using_adapter``, ``disabled_adapters`` and ``batch_adapters`` are per call: each opens a
:class:`View` for the thread that entered it, an overlay on the model's own state (which ``set_adapter``
changes, model-wide as in PEFT). Adapter modules read what runs through :func:`per_thread` properties, so a
request's block never shows in another thread's forward. torch.compile guards on the thread-local read: a
compiled model recompiles once per view instead of running a stale graph (tests/test_threads.py). A thread
started inside a block sees it only through :func:`carry_blocks`.

**The model's lock** (:class:`ModelLock`, in the model's ``__dict__``): forwards of the model and open blocks
share it; what changes the adapters themselves (loading, hot swaps, ``set_adapter``, merging, deleting) takes
it alone, waiting for the forwards and blocks in flight. A forward sees the adapters before a change or after
it, never half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.compiler import is_compiling

from .errors import ConcurrencyError
from .guards import _wrapper_kind, unwrap


class _Local(threading.local):
    views: dict | None = None  # {adapter module: View} of this thread's open blocks
    holds: tuple = ()  # the locks this thread's open per-thread blocks hold shared
    alias: int | None = None  # a thread running a block carried in (carry_blocks): the block's thread


LOCAL = _Local()


def _me() -> int:
    """Who holds locks for this thread: itself, or the thread whose block it carries."""
    return LOCAL.alias or threading.get_ident()


@dataclasses.dataclass(frozen=True)
class View:
    """One adapter module as this thread's blocks see it: which adapters run (``None``: the module's own),
    whether they are off, and the per-row routing of ``batch_adapters`` (``None``: none)."""

    active: tuple[str, ...] | None = None
    disabled: bool = False
    routing: object = None


def view_of(module: nn.Module) -> View | None:
    views = LOCAL.views
    return None if views is None else views.get(module)


def per_thread(field: str, view_field: str, default=None) -> property:
    """A property answering this thread's view where it sets ``view_field``, else the module's own ``field``,
    kept in ``__dict__`` under that name (assignments write it there)."""

    def read(self):
        views = LOCAL.views
        if views is not None:
            view = views.get(self)
            if view is not None:
                value = getattr(view, view_field)
                if value is not None and value is not False:
                    return value
        return self.__dict__.get(field, default)

    def write(self, value) -> None:
        self.__dict__[field] = value

    return property(read, write, doc=f"``{field}`` as this thread sees it (see lora_inject/threads.py).")


@contextlib.contextmanager
def opened(model: nn.Module, modules: Iterable[nn.Module], **changes) -> Iterator[None]:
    """This thread sees ``modules`` with ``changes`` (View fields) on top of its enclosing views, holding
    ``model``'s lock shared. Whichever thread ends the block (a generator resumed elsewhere), the entering
    thread's views and hold are put back; ending it in another thread is then an error, since forwards run
    there meanwhile did not see the block."""
    state, me, lock = LOCAL.__dict__, _me(), model_lock(model)
    lock.acquire_shared(me)
    before_views, before_holds = state.get("views"), state.get("holds", ())
    views = dict(before_views) if before_views else {}
    for module in modules:
        views[module] = dataclasses.replace(views.get(module) or View(), **changes)
    state["views"], state["holds"] = views, (*before_holds, lock)
    entered = threading.get_ident()
    try:
        yield
    finally:
        state["views"], state["holds"] = before_views, before_holds
        lock.release_shared(me)
    if threading.get_ident() != entered:
        raise ConcurrencyError(
            "A using_adapter/batch_adapters/disabled_adapters block ended in another thread than the one that "
            "entered it (a generator resumed by a thread pool?). Blocks belong to their thread: forwards run in the "
            "other thread did not see it. Enter the block around each step, or run the whole request in one thread."
        )


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """This thread sees the model's own state: what changes the model reads and writes that, not a view."""
    state = LOCAL.__dict__
    before = state.get("views")
    state["views"] = None
    try:
        yield
    finally:
        state["views"] = before


def carry_blocks(function: Callable) -> Callable:
    """``function``, to run in another thread, seeing the blocks open in this thread now, as this thread does.

    For a thread a block starts, such as transformers' streaming ``generate`` (``TextIteratorStreamer``)::

        with li.using_adapter(model, "support"):
            Thread(target=li.carry_blocks(model.generate), kwargs=...).start()
            for text in streamer: ...

    Without it the new thread runs the model's own adapters, and would wait behind a change that waits for
    the block (which waits for the thread).
    """
    views, holds, alias = LOCAL.views, LOCAL.holds, _me()

    @functools.wraps(function)
    def carried(*args, **kwargs):
        state = LOCAL.__dict__
        before = state.get("views"), state.get("holds", ()), state.get("alias")
        state["views"], state["holds"], state["alias"] = views, holds, alias
        try:
            return function(*args, **kwargs)
        finally:
            state["views"], state["holds"], state["alias"] = before

    return carried


def keep_recent(kept: dict, limit: int) -> None:
    """Drop the oldest entries of the cache ``kept`` beyond ``limit``; other threads may change it meanwhile."""
    while len(kept) > limit:
        try:
            kept.pop(next(iter(kept)), None)
        except (RuntimeError, StopIteration):  # changed or emptied by another thread meanwhile: look again
            continue


class ModelLock:
    """Shared by forwards and open blocks, taken alone by changes; re-entrant both ways in one thread.

    A change waits for every other holder to leave, and new shared holders wait while a change waits (so a
    stream of requests cannot starve a hot swap). A thread holding it shared may change the model once the
    others have left; two threads doing that at once would wait for each other forever, so the second is
    refused with :class:`ConcurrencyError`. Holders are thread ids (:func:`_me`), given where a hold taken in
    one thread may be let go in another.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._shared: dict[int, int] = {}  # thread id -> depth
        self._forwards: dict[int, int] = {}  # thread id -> forwards of the model it is inside
        self._owner: int | None = None
        self._depth = 0
        self._waiting = 0  # changes waiting
        self._upgrading: int | None = None

    def __deepcopy__(self, memo) -> ModelLock:
        return ModelLock()  # a copied model is another model: nobody holds its lock yet

    def __reduce__(self):
        return ModelLock, ()

    def _take_shared(self, me: int) -> None:
        if self._owner != me and me not in self._shared:
            while self._owner is not None or self._waiting:
                self._cond.wait()
        self._shared[me] = self._shared.get(me, 0) + 1

    def _drop_shared(self, me: int) -> None:
        depth = self._shared.get(me, 0)
        if depth <= 1:
            self._shared.pop(me, None)
            self._cond.notify_all()
        else:
            self._shared[me] = depth - 1

    def acquire_shared(self, me: int | None = None) -> None:
        with self._mutex:
            self._take_shared(me or _me())

    def release_shared(self, me: int | None = None) -> None:
        with self._mutex:
            self._drop_shared(me or _me())

    def enter_forward(self) -> None:
        me = _me()
        with self._mutex:
            self._take_shared(me)
            self._forwards[me] = self._forwards.get(me, 0) + 1

    def leave_forward(self) -> None:
        """Pairs with :meth:`enter_forward` of this thread: a hook before ours that raised calls the leaving hook
        without an enter, which must not release a block's hold."""
        me = _me()
        with self._mutex:
            depth = self._forwards.get(me, 0)
            if depth:
                if depth == 1:
                    del self._forwards[me]
                else:
                    self._forwards[me] = depth - 1
                self._drop_shared(me)

    def acquire(self) -> int:
        me = _me()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return me
            if me in self._shared:
                if self._upgrading is not None:
                    raise ConcurrencyError(
                        "Two threads inside blocks or forwards of this model both tried to change its adapters; each "
                        "waits for the other to leave, so this one gives up. Change adapters (load, hot swap, "
                        "set_adapter, merge) outside using_adapter/batch_adapters blocks."
                    )
                self._upgrading = me
            self._waiting += 1
            try:
                while self._owner is not None or any(t != me for t in self._shared):
                    self._cond.wait()
            finally:
                self._waiting -= 1
                if self._upgrading == me:
                    self._upgrading = None
                self._cond.notify_all()  # shared holders held back by this waiting change may go on
            self._owner, self._depth = me, 1
            return me

    def release(self) -> None:
        with self._cond:
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        me = _me()
        self.acquire_shared(me)
        try:
            yield
        finally:
            self.release_shared(me)

    @contextlib.contextmanager
    def alone(self) -> Iterator[None]:
        self.acquire()
        try:
            yield
        finally:
            self.release()


_LOCK_ATTR = "_lora_inject_lock"
_CREATING = threading.Lock()


def model_lock(model: nn.Module) -> ModelLock:
    """``model``'s lock, kept in its ``__dict__`` (``copy.deepcopy`` and pickling give a copy a fresh one)."""
    lock = model.__dict__.get(_LOCK_ATTR)
    if lock is None:
        with _CREATING:
            lock = model.__dict__.setdefault(_LOCK_ATTR, ModelLock())
    return lock


@contextlib.contextmanager
def changing(model: nn.Module) -> Iterator[None]:
    """Around what changes ``model``'s adapters: alone, and on the model's own state (not this thread's views).
    Adapter modules it adds while this thread is inside blocks on the model join those blocks' views."""
    with model_lock(model).alone():
        views = LOCAL.views
        with suspended():
            yield
        if views:
            _extend(views, model)


def _extend(views: dict, model: nn.Module) -> None:
    modules = list(model.modules())
    template = next((views[m] for m in modules if m in views), None)
    if template is not None:
        for module in modules:
            if module not in views and hasattr(module, "prepare_active"):  # an adapter module (layers/base.py)
                views[module] = template


def changes_adapters(function):
    """``function(model, ...)`` changes the adapters: it runs :func:`changing` the (unwrapped) model."""

    @functools.wraps(function)
    def run(model, *args, **kwargs):
        with changing(_holder(model)):
            return function(model, *args, **kwargs)

    return run


def _holder(model: nn.Module) -> nn.Module:
    """The module whose lock forwards take: inside torch.compile, DDP and DeepSpeed wrappers."""
    inner = unwrap(model)
    if _wrapper_kind(inner) == "DeepSpeed" and isinstance(getattr(inner, "module", None), nn.Module):
        return inner.module
    return inner


# ----- every forward of the model holds its lock shared ----------------------------------------------------
# A compiled graph cannot take a lock: under torch.compile(model) the hooks are traced as nothing (docs/serving.md).
# Nor does a forward run again by backward (activation checkpointing of the whole model), which may run in
# autograd's own thread while the block that began it holds the model alone.
def _enter_forward(module: nn.Module, args) -> None:
    if is_compiling() or torch._C._current_graph_task_id() != -1:
        return
    lock = module.__dict__.get(_LOCK_ATTR) or model_lock(module)
    lock.enter_forward()
    if _leave_forward not in module._forward_hooks.values():  # unloaded while this forward waited: nothing
        lock.leave_forward()                                  # will let go of the hold


def _leave_forward(module: nn.Module, args, output) -> None:
    if is_compiling() or torch._C._current_graph_task_id() != -1:
        return
    lock = module.__dict__.get(_LOCK_ATTR)
    if lock is not None:
        lock.leave_forward()


def _entry_modules(model: nn.Module) -> list[nn.Module]:
    """The model and what is called on its own from outside it: an encoder-decoder's encoder (``generate``
    calls ``get_encoder()`` directly)."""
    modules = [model]
    get_encoder = getattr(type(model), "get_encoder", None)
    if callable(get_encoder):
        with contextlib.suppress(Exception):
            encoder = model.get_encoder()
            if isinstance(encoder, nn.Module) and encoder is not model:
                modules.append(encoder)
    return modules


def hold_during_forwards(model: nn.Module) -> None:
    """Hooks on ``model`` (the module adapters were injected into) holding its lock for each forward; once."""
    lock = model_lock(model)
    for module in _entry_modules(model):
        module.__dict__[_LOCK_ATTR] = lock
        if _enter_forward not in module._forward_pre_hooks.values():
            module.register_forward_pre_hook(_enter_forward, prepend=True)
            module.register_forward_hook(_leave_forward, always_call=True)


def release_forwards(model: nn.Module) -> None:
    """Remove :func:`hold_during_forwards`' hooks (the model is plain again)."""
    for module in _entry_modules(model):
        for hooks, hook in ((module._forward_pre_hooks, _enter_forward), (module._forward_hooks, _leave_forward)):
            for key in [k for k, v in hooks.items() if v is hook]:
                del hooks[key]
                module._forward_hooks_always_called.pop(key, None)
