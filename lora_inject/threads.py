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
import sys
import threading
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.compiler import is_compiling

from .errors import ConcurrencyError
from .guards import _wrapper_kind, unwrap


class _Local(threading.local):
    """Per-thread state. ``__init__`` runs in every thread on its first use, so each thread has its own
    attributes and no class defaults: torch.compile guards on what the thread's own attribute holds."""

    def __init__(self) -> None:
        self.views: dict | None = None  # {adapter module: View} of this thread's open blocks
        self.parent: int | None = None  # in a thread carrying a block in (carry_blocks): the block's thread
        self.blocks = 0  # blocks open in this thread, model-wide ones included


LOCAL = _Local()
_me = threading.get_ident  # who holds a lock: a thread, by its id


@dataclasses.dataclass(frozen=True)
class View:
    """One adapter module as this thread's blocks see it: which adapters run (``None``: the module's own),
    whether they are off, and the per-row routing of ``batch_adapters`` (``None``: none)."""

    active: tuple[str, ...] | None = None
    disabled: bool = False
    routing: object = None


def _inside_forward(frame, module_id: int) -> bool:
    """Whether the stack ending in ``frame`` (another thread's) runs a forward of the module ``module_id``."""
    call = nn.Module._call_impl.__code__
    while frame is not None:
        if frame.f_code is call and id(frame.f_locals.get("self")) == module_id:
            return True
        frame = frame.f_back
    return False


def view_of(module: nn.Module) -> View | None:
    views = LOCAL.views
    return None if views is None else views.get(module)


def per_thread(field: str, view_field: str) -> property:
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
        return self.__dict__.get(field)

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
    try:
        before = state.get("views")
        views = dict(before) if before else {}
        for module in modules:
            views[module] = dataclasses.replace(views.get(module) or View(), **changes)
        state["views"] = views
        yield
    finally:
        state["views"] = before
        lock.release_shared(me)
    if threading.get_ident() != me:
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
    the block (which waits for the thread). The carried thread keeps the block's adapters until it returns;
    changes wait for its forwards like any other thread's, and one made from it while the block is open is
    refused (the block would wait for it, and it for the block).
    """
    views, parent = LOCAL.views, (_me() if LOCAL.blocks else None)

    @functools.wraps(function)
    def carried(*args, **kwargs):
        state = LOCAL.__dict__
        before = state.get("views"), state.get("parent")
        state["views"], state["parent"] = views, parent
        try:
            return function(*args, **kwargs)
        finally:
            state["views"], state["parent"] = before

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
        self._forwards: dict[tuple[int, int], int] = {}  # (thread id, module id) of forwards in flight
        self._owner: int | None = None
        self._depth = 0
        self._waiting = 0  # changes waiting
        self._upgrading: int | None = None
        self._siblings: tuple = ()  # the locks a waiting pipeline change (changing_all) takes with this one

    def __deepcopy__(self, memo) -> ModelLock:
        return ModelLock()  # a copied model is another model: nobody holds its lock yet

    def __reduce__(self):
        return ModelLock, ()

    def _take_shared(self, me: int) -> None:
        if self._owner != me and me not in self._shared:
            parent = LOCAL.parent  # a carried thread joins its block (even one holding the model alone) without
            while (self._owner is not None and self._owner != parent) or (  # waiting for queued changes
                    self._waiting and parent not in self._shared and not self._holds_sibling(me)):
                self._wait()
        self._shared[me] = self._shared.get(me, 0) + 1

    def _holds_sibling(self, me: int) -> bool:
        """Whether ``me`` holds another lock of a pipeline change waiting for this one (``changing_all``): it is
        let in, or it would wait for the change, which waits for it to leave the other."""
        return any(me in sibling._shared for sibling in self._siblings if sibling is not self)

    def _wait(self) -> None:
        """Wait for a change of state; every second, let go of forward holds whose forward is over: a
        KeyboardInterrupt/SystemExit in a forward skips the leaving hook (torch calls it for ``Exception``
        only), and the thread may even be gone."""
        if not self._cond.wait(timeout=1.0):
            frames = sys._current_frames()
            for key in list(self._forwards):
                if not _inside_forward(frames.get(key[0]), key[1]):
                    for _ in range(self._forwards.pop(key)):
                        self._drop_shared(key[0])
            self._cond.notify_all()

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

    def enter_forward(self, module: nn.Module) -> None:
        key = (_me(), id(module))
        with self._mutex:
            self._take_shared(key[0])
            self._forwards[key] = self._forwards.get(key, 0) + 1

    def leave_forward(self, module: nn.Module) -> None:
        """Pairs with :meth:`enter_forward` of this thread: a hook before ours that raised calls the leaving hook
        without an enter, which must not release a block's hold."""
        key = (_me(), id(module))
        with self._mutex:
            depth = self._forwards.get(key, 0)
            if depth:
                if depth == 1:
                    del self._forwards[key]
                else:
                    self._forwards[key] = depth - 1
                self._drop_shared(key[0])

    def acquire(self, blocking: bool = True) -> bool:
        me = _me()
        with self._cond:
            if self._owner == me:  # nested: still wait for threads carrying this thread's block in
                while any(t != me for t in self._shared):
                    self._wait()
                self._depth += 1
                return True
            if not blocking:
                if self._owner is not None or any(t != me for t in self._shared):
                    return False
                self._owner, self._depth = me, 1
                return True
            if LOCAL.parent is not None and LOCAL.parent in self._shared:
                raise ConcurrencyError(
                    "A thread carrying a block (carry_blocks) tried to change the model while the block is open: "
                    "the block's thread would wait for it, and it for the block. Change adapters outside blocks."
                )
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
                    self._wait()
            finally:
                self._waiting -= 1
                if self._upgrading == me:
                    self._upgrading = None
                self._cond.notify_all()  # shared holders held back by this waiting change may go on
            self._owner, self._depth = me, 1
            return True

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


_GROUP = threading.Lock()  # pipeline changes announce themselves on all their locks at once


@contextlib.contextmanager
def changing_all(models: list[nn.Module]) -> Iterator[None]:
    """:func:`changing` several models at once (a pipeline's components), taken together: the change is
    announced on every lock at once (new forwards wait, except those of threads inside a block on one of them,
    which would otherwise wait for the change that waits for them), and all are taken when all are free."""
    locks = sorted({id(lock): lock for lock in (model_lock(m) for m in models)}.values(), key=id)
    me = _me()
    with _GROUP:
        upgrading = any(me in lock._shared for lock in locks)
        if upgrading and any(lock._upgrading not in (None, me) for lock in locks):
            raise ConcurrencyError(
                "Two threads inside blocks on a pipeline's components both tried to change it; each waits for the "
                "other to leave, so this one gives up. Change adapters (load_lora, set_weights) outside blocks."
            )
        for lock in locks:
            with lock._mutex:
                lock._waiting += 1
                lock._siblings = tuple(locks)
                lock._upgrading = me if upgrading else lock._upgrading
    try:
        _take_all(locks, me)
    finally:
        for lock in locks:
            with lock._cond:
                lock._waiting -= 1
                lock._siblings = () if not lock._waiting else lock._siblings
                lock._upgrading = None if lock._upgrading == me else lock._upgrading
                lock._cond.notify_all()
    views = LOCAL.views
    try:
        with suspended():
            yield
        for model in models if views else ():
            _extend(views, model)
    finally:
        for lock in locks:
            lock.release()


def _take_all(locks: list[ModelLock], me: int) -> None:
    """Own every lock once none is held by another thread (each mutex held while looking, so nothing slips in)."""
    while True:
        for lock in locks:
            lock._mutex.acquire()
        busy = next((lock for lock in locks if lock._owner not in (None, me)
                     or any(t != me for t in lock._shared)), None)
        if busy is None:
            for lock in locks:
                lock._depth = lock._depth + 1 if lock._owner == me else 1
                lock._owner = me
                lock._mutex.release()
            return
        for lock in locks:
            if lock is not busy:
                lock._mutex.release()
        try:
            busy._wait()
        finally:
            busy._mutex.release()


def changes_adapters(function):
    """``function(model, ...)`` changes the adapters: it runs :func:`changing` the (unwrapped) model."""

    @functools.wraps(function)
    def run(model, *args, **kwargs):
        with changing(_holder(model)):
            return function(model, *args, **kwargs)

    return run


def reads_adapters(function):
    """``function(model, ...)`` reads the adapters whole (a save): it holds the model's lock shared, so no change
    lands halfway through, and reads the model's own state. A first argument that is no model (a path, a
    pipeline) is passed through as it is."""

    @functools.wraps(function)
    def run(model, *args, **kwargs):
        holder = _holder(model) if isinstance(model, nn.Module) else None
        if holder is None:
            return function(model, *args, **kwargs)
        with model_lock(holder).shared(), suspended():
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
# DataParallel's replicas (``_is_replica``) run in its worker threads: they hold nothing (the call that made them
# is the user's, outside the model); their adapter modules carry the maker's view (layers/base.py).
def _enter_forward(module: nn.Module, args) -> None:
    own = module.__dict__
    if is_compiling() or torch._C._current_graph_task_id() != -1 or own.get("_is_replica"):
        return
    lock = own.get(_LOCK_ATTR) or model_lock(module)
    lock.enter_forward(module)
    if _leave_forward not in module._forward_hooks.values():  # unloaded while this forward waited: nothing
        lock.leave_forward(module)                            # will let go of the hold


def _leave_forward(module: nn.Module, args, output) -> None:
    own = module.__dict__
    if is_compiling() or torch._C._current_graph_task_id() != -1 or own.get("_is_replica"):
        return
    lock = own.get(_LOCK_ATTR)
    if lock is not None:
        lock.leave_forward(module)


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
