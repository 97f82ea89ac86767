"""Weight streams: reads from memory or the store; writes validated per chunk, staged, committed once.

`read_weights` serves the current revision from the resident variables
(copy-on-write snapshots) and older ones from the store's files.

A `WeightWrite` lives for one WriteWeights stream. Each chunk is checked and
copied once, into an aligned buffer that will become the variable's storage;
a background thread writes the filled parts of the buffers to the staged
files while the rest streams in, and fsyncs each finished large tensor (small
ones are packed into one file, written and fsync'd at commit).
Nothing is visible until `commit`, which re-checks the expected revision
under the model's commit lock, renames the staged revision into place and
only then hands the buffers to the variables (no copy on the CPU). A stream
that is cut off, or any invalid chunk, discards the staging folder: the model
never changes.

The staged buffers count against the server's staging budget
(`--max-staging-mb`, a `staging.Budget`): each tensor's bytes are taken
before its buffer is allocated (RESOURCE_EXHAUSTED `STAGING_MEMORY_EXHAUSTED`
when they do not fit) and given back when the write commits or aborts.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from weightsmith_server.dtypes import numpy_dtype, numpy_dtype_for
from weightsmith_server.errors import Aborted, InvalidArgument, NotFound
from weightsmith_server.manifests import VariableRecord
from weightsmith_server.models.host import ModelHost
from weightsmith_server.models.resident import ResidentModel
from weightsmith_server.numerics import all_finite
from weightsmith_server.revisions.commit import Change, check_expected_revision, replace_entries
from weightsmith_server.revisions.record import RevisionDraft, RevisionKind, RevisionRecord
from weightsmith_server.selectors import Selector, select
from weightsmith_server.staging import Budget
from weightsmith_server.tensor_files import TensorWriter
from weightsmith_server.zerocopy import aligned_empty, snapshot

log = logging.getLogger(__name__)

# Received chunks are copied into their buffers on one thread, and written to
# disk on another, so that neither holds up the event loop receiving the rest.
_COPIER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightsmith-copy")
_DISK = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightsmith-disk")

# Hand filled parts of a tensor to the disk thread in pieces of at least this.
_FLUSH_BYTES = 8 * 1024 * 1024


class WeightWrite:
    """One WriteWeights stream, from header to commit or abort."""

    def __init__(
        self,
        host: ModelHost,
        model_id: str,
        *,
        expected_revision: int | None,
        message: str,
        allow_non_finite: bool,
        author: str,
        staging: Budget | None = None,
    ) -> None:
        self._host = host
        self._model_id = model_id
        self._expected = expected_revision
        self._known = host.run(model_id, self._check_writable, field="header.model_id")
        # "open" until commit or abort claims the write; the other then does nothing.
        self._phase = "open"
        self._phase_lock = threading.Lock()
        self._message = message
        self._allow_non_finite = allow_non_finite
        self._author = author
        self._staged = host.stage(model_id, "header.model_id")
        self._lease = staging.acquire(0) if staging is not None else None
        self._written: dict[str, VariableRecord] = {}
        self._values: dict[str, np.ndarray] = {}
        self._disk: list[Future[None]] = []
        self._writer: TensorWriter | None = None
        self._target = np.empty(0, np.uint8)
        self._last_copy: Future[None] | None = None
        self._dtype = np.dtype("u1")
        self._filled = 0
        self._flushed = 0
        self._size = 0
        self._index = 0
        self._last_field = "chunks"

    def _check_writable(self, resident: ResidentModel) -> dict[str, VariableRecord]:
        """Refuse the write up front if it could not commit; returns the variables it may write."""
        resident.check_not_busy("header.model_id")
        check_expected_revision(resident, self._expected, "header.expected_revision")
        return resident.state.manifest.by_path()

    def add(self, name: str, dtype: int, shape: tuple[int, ...], offset: int, data: memoryview) -> None:
        """Validate one chunk and append it to its staged tensor file."""
        field = f"chunks[{self._index}]"
        self._index += 1
        if name:
            self._start_tensor(name, dtype, shape, field)
        elif self._writer is None:
            raise InvalidArgument(
                "Received a chunk without a name that does not continue a tensor; the first "
                "chunk of each tensor carries its name, dtype and shape.",
                reason="ORPHAN_CHUNK",
                field=f"{field}.name",
            )
        self._check_chunk(offset, data, field)
        end = offset + len(data)
        if end > offset:
            self._last_copy = _COPIER.submit(
                np.copyto, self._target[offset:end], np.frombuffer(data, np.uint8)
            )
        self._filled = end
        if self._filled - self._flushed >= _FLUSH_BYTES:
            self._flush(final=False)
        self._last_field = field

    def _start_tensor(self, name: str, dtype: int, shape: tuple[int, ...], field: str) -> None:
        """Finish the previous tensor, check the new one's header and open its staged file."""
        self._finish_tensor()
        known = self._known.get(name)
        if known is None:
            raise InvalidArgument(
                f"Received an unknown variable {name!r}; GetModel lists the model's variables.",
                reason="UNKNOWN_VARIABLE",
                field=f"{field}.name",
            )
        if name in self._written:
            raise InvalidArgument(
                f"Variable {name!r} was sent twice in one write.",
                reason="DUPLICATE_VARIABLE",
                field=f"{field}.name",
            )
        received = numpy_dtype_for(dtype, field=f"{field}.dtype")
        expected = numpy_dtype(known.dtype)
        if received != expected:
            raise InvalidArgument(
                f"Received dtype {received.name} for {name!r}, expected {expected.name}.",
                reason="WRONG_DTYPE",
                field=f"{field}.dtype",
            )
        if tuple(shape) != known.shape:
            raise InvalidArgument(
                f"Received shape {list(shape)} for {name!r}, expected {list(known.shape)}.",
                reason="WRONG_SHAPE",
                field=f"{field}.shape",
            )
        if self._lease is not None:
            self._lease.grow(known.nbytes, field=f"{field}.name")
        try:
            self._writer = self._staged.open_tensor(known.entry, expected, known.shape)
        except FileNotFoundError:  # the staging folder went with a deleted model
            raise self._deleted() from None
        value = aligned_empty(known.shape, expected)
        self._values[name] = value
        self._target = value.reshape(-1).view(np.uint8)
        self._dtype = expected
        self._filled = 0
        self._flushed = 0
        self._size = known.nbytes

    def _check_chunk(self, offset: int, data: memoryview, field: str) -> None:
        """A chunk continues its tensor exactly, holds whole elements, and finite ones unless allowed."""
        assert self._writer is not None
        path = self._writer.record.path
        if offset != self._filled:
            problem = "overlaps earlier bytes" if offset < self._filled else "leaves a gap"
            raise InvalidArgument(
                f"Received a chunk of {path!r} at byte offset {offset} that {problem}; "
                f"expected offset {self._filled}.",
                reason="CHUNK_OFFSET_MISMATCH",
                field=f"{field}.offset",
            )
        end = offset + len(data)
        if not data and self._size:
            raise InvalidArgument(
                f"Received an empty chunk for {path!r}; every chunk of a non-empty tensor carries bytes.",
                reason="EMPTY_CHUNK",
                field=f"{field}.data",
            )
        if end > self._size:
            raise InvalidArgument(
                f"Received a chunk of {path!r} ending at byte {end}, past its {self._size} bytes.",
                reason="CHUNK_PAST_END",
                field=f"{field}.data",
            )
        if len(data) % self._dtype.itemsize:
            raise InvalidArgument(
                f"Received {len(data)} bytes, not a whole number of {self._dtype.name} elements; "
                "split tensors on element boundaries.",
                reason="PARTIAL_ELEMENT",
                field=f"{field}.data",
            )
        floating = self._dtype.kind == "f" or self._dtype.name == "bfloat16"
        if floating and not self._allow_non_finite and not all_finite(np.frombuffer(data, dtype=self._dtype)):
            raise InvalidArgument(
                f"Received NaN or infinite values for {path!r}; set allow_non_finite to "
                "write them on purpose.",
                reason="NON_FINITE_VALUES",
                field=f"{field}.data",
            )

    def _finish_tensor(self) -> None:
        writer = self._writer
        if writer is None:
            return
        if self._filled != self._size:
            raise InvalidArgument(
                f"Tensor {writer.record.path!r} ended after {self._filled} of {self._size} bytes.",
                reason="INCOMPLETE_TENSOR",
                field=self._last_field,
            )
        self._flush(final=True)
        self._writer = None
        self._written[writer.record.path] = writer.record

    def _flush(self, *, final: bool) -> None:
        """Queue the filled, not yet written bytes (block-aligned unless final)."""
        writer = self._writer
        assert writer is not None
        stop = self._filled if final else self._filled - self._filled % 4096
        if stop > self._flushed:
            copied = self._last_copy
            start, pending = self._flushed, memoryview(self._target[self._flushed : stop])

            def write() -> None:
                if copied is not None:
                    copied.result()  # the copier works in order: all bytes up to here are in
                writer.write_at(start, pending)

            self._disk.append(_DISK.submit(write))
            self._flushed = stop
        if final:
            self._disk.append(_DISK.submit(writer.close))

    def _deleted(self) -> NotFound:
        return NotFound(
            f"Model {self._model_id!r} was deleted while the write streamed.",
            reason="MODEL_NOT_FOUND",
            field="header.model_id",
        )

    def _claim(self, phase: str) -> bool:
        with self._phase_lock:
            if self._phase != "open":
                return False
            self._phase = phase
            return True

    def commit(self) -> RevisionRecord:
        """Make the write durable, then visible, as one new revision."""
        if not self._claim("committing"):
            raise Aborted("The write was cancelled.", reason="WRITE_CANCELLED", field="chunks")
        try:
            self._finish_tensor()
            if not self._written:
                raise InvalidArgument(
                    "The write carried no tensor; send at least one after the header.",
                    reason="EMPTY_WRITE",
                    field="chunks",
                )
            for pending in self._disk:
                pending.result()
        except BaseException:
            self._discard()
            raise
        try:
            return self._host.commit(
                self._model_id,
                self._staged,
                self._prepare,
                expected_revision=self._expected,
                field_prefix="header.",
            )
        finally:
            # Committed, the buffers are the variables' storage; refused, they are garbage.
            self._release_memory()

    def _prepare(self, resident: ResidentModel) -> Change:
        current = resident.state.manifest
        known = current.by_path()
        for path, record in self._written.items():
            now = known.get(path)
            if now is None or now.shape != record.shape or now.dtype != record.dtype:
                raise Aborted(
                    f"Variable {path!r} changed shape or disappeared while the write streamed.",
                    reason="ARCHITECTURE_CHANGED",
                    field="chunks",
                )
        changed = [v.path for v in current.variables if v.path in self._written]
        draft = RevisionDraft(
            kind=RevisionKind.WRITE_WEIGHTS,
            author=self._author,
            message=self._message,
            summary=f"wrote {len(changed)} variable(s), {self._staged.stored_bytes} bytes",
            changed_variables=changed,
        )
        return Change(draft, replace_entries(current, self._written), self._values)

    def abort(self) -> None:
        """Drop everything staged, unless a commit has claimed the write."""
        if self._claim("aborted"):
            self._discard()

    def _discard(self) -> None:
        for pending in self._disk:
            try:
                pending.result()
            except OSError:
                log.exception("writing a discarded tensor failed")
        if self._writer is not None:
            self._writer.discard()
            self._writer = None
        self._staged.discard()
        self._release_memory()

    def _release_memory(self) -> None:
        """Drop the staged buffers and give their bytes back to the staging budget."""
        self._values = {}
        self._target = np.empty(0, np.uint8)
        if self._lease is not None:
            self._lease.release()


def read_weights(
    host: ModelHost, model_id: str, selector: Selector, revision: int
) -> tuple[int, list[tuple[str, np.ndarray]]]:
    """The selected variables of a revision, as read-only arrays.

    The current revision comes from the resident variables (copy-on-write
    snapshots: no copy on the CPU), older ones from the store's files.
    """
    number, manifest = host.revision(model_id, revision)
    entries = [v.entry for v in manifest.variables]
    paths = set(select(selector, entries, manifest.layer_count, field="selector"))
    chosen = [v for v in manifest.variables if v.path in paths]

    def from_memory(resident: ResidentModel) -> list[tuple[str, np.ndarray]] | None:
        with resident.lock.read():
            state = resident.state
            if state.revision.revision != number:
                return None
            return [(v.path, snapshot(state.variables[v.path])) for v in chosen]

    # An older revision is read from the store: the model need not be loaded (or kept) for it.
    current = number if revision == 0 else host.revision(model_id, 0)[0]
    arrays = host.run(model_id, from_memory) if number == current else None
    if arrays is None:
        arrays = [(v.path, host.store.load_tensor(model_id, v)) for v in chosen]
    return number, arrays
