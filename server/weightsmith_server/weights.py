"""Streaming weight writes: validate each chunk, stage it on disk, commit once.

A `WeightWrite` lives for one WriteWeights stream. Each chunk is checked and
copied once, into an aligned buffer that will become the variable's storage;
a background thread writes the filled parts of the buffers to the staged
`.npy` files while the rest streams in, and fsyncs each finished tensor.
Nothing is visible until `commit`, which re-checks the expected revision
under the model's commit lock, renames the staged revision into place and
only then hands the buffers to the variables (no copy on the CPU). A stream
that is cut off, or any invalid chunk, discards the staging folder: the model
never changes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from weightsmith._wire import ChunkView
from weightsmith_server.errors import Aborted, InvalidArgument
from weightsmith_server.registry import Registry, ResidentModel, utc_now
from weightsmith_server.store import (
    Manifest,
    RevisionRecord,
    TensorFileWriter,
    VariableRecord,
    numpy_dtype,
)
from weightsmith_server.tensors import numpy_dtype_for
from weightsmith_server.zerocopy import aligned_empty

log = logging.getLogger(__name__)

# Received chunks are copied into their buffers on one thread, and written to
# disk on another, so that neither holds up the event loop receiving the rest.
_COPIER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightsmith-copy")
_DISK = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weightsmith-disk")

# Hand filled parts of a tensor to the disk thread in pieces of at least this.
_FLUSH_BYTES = 8 * 1024 * 1024


def _all_finite(values: np.ndarray) -> bool:
    """Whether no element is NaN or infinite.

    A NaN or infinity anywhere makes the sum non-finite, so a finite sum (one
    pass, no temporary array) proves it; a non-finite sum may only be an
    overflow of large finite values, which the exact check then settles.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(values.sum()):
            return True
    return bool(np.isfinite(values).all())


def check_expected_revision(resident: ResidentModel, expected: int | None, field: str) -> None:
    """Raise `Aborted` when the model moved past the revision the caller expects."""
    if expected is not None and expected != resident.revision:
        raise Aborted(
            f"Model {resident.model_id!r} is at revision {resident.revision}, not the expected "
            f"revision {expected}; re-read it and retry.",
            reason="REVISION_MISMATCH",
            field=field,
            metadata={"current_revision": str(resident.revision), "expected_revision": str(expected)},
        )


class WeightWrite:
    """One WriteWeights stream, from header to commit or abort."""

    def __init__(
        self,
        registry: Registry,
        model_id: str,
        *,
        expected_revision: int | None,
        message: str,
        allow_non_finite: bool,
        author: str,
    ) -> None:
        self._registry = registry
        self._resident = registry.get(model_id, field="header.model_id")
        check_expected_revision(self._resident, expected_revision, "header.expected_revision")
        self._expected = expected_revision
        self._message = message
        self._allow_non_finite = allow_non_finite
        self._author = author
        self._known = self._resident.state.manifest.by_path()
        self._staged = registry.store.stage_revision(model_id)
        self._written: dict[str, VariableRecord] = {}
        self._values: dict[str, np.ndarray] = {}
        self._disk: list[Future[None]] = []
        self._writer: TensorFileWriter | None = None
        self._target = np.empty(0, np.uint8)
        self._last_copy: Future[None] | None = None
        self._dtype = np.dtype("u1")
        self._filled = 0
        self._flushed = 0
        self._size = 0
        self._index = 0
        self._last_field = "chunks"

    def add(self, name: str, dtype: int, shape: tuple[int, ...], offset: int, data: memoryview) -> None:
        """Validate one chunk and append it to its staged tensor file."""
        field = f"chunks[{self._index}]"
        self._index += 1
        if name:
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
            self._writer = self._staged.open_tensor(known.entry, expected, known.shape)
            value = aligned_empty(known.shape, expected)
            self._values[name] = value
            self._target = value.reshape(-1).view(np.uint8)
            self._dtype = expected
            self._filled = 0
            self._flushed = 0
            self._size = known.nbytes
        elif self._writer is None:
            raise InvalidArgument(
                "Received a chunk without a name that does not continue a tensor; the first "
                "chunk of each tensor carries its name, dtype and shape.",
                reason="ORPHAN_CHUNK",
                field=f"{field}.name",
            )
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
        if (
            floating
            and not self._allow_non_finite
            and not _all_finite(np.frombuffer(data, dtype=self._dtype))
        ):
            raise InvalidArgument(
                f"Received NaN or infinite values for {path!r}; set allow_non_finite to "
                "write them on purpose.",
                reason="NON_FINITE_VALUES",
                field=f"{field}.data",
            )
        if end > offset:
            self._last_copy = _COPIER.submit(
                np.copyto, self._target[offset:end], np.frombuffer(data, np.uint8)
            )
        self._filled = end
        if self._filled - self._flushed >= _FLUSH_BYTES:
            self._flush(final=False)
        self._last_field = field

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

    def commit(self) -> RevisionRecord:
        """Make the write durable, then visible, as one new revision."""
        self._finish_tensor()
        if not self._written:
            raise InvalidArgument(
                "The write carried no tensor; send at least one after the header.",
                reason="EMPTY_WRITE",
                field="chunks",
            )
        for pending in self._disk:
            pending.result()
        resident = self._resident
        with resident.commit_lock:
            check_expected_revision(resident, self._expected, "header.expected_revision")
            current = resident.state.manifest
            for path, record in self._written.items():
                known = current.by_path().get(path)
                if known is None or known.shape != record.shape or known.dtype != record.dtype:
                    raise Aborted(
                        f"Variable {path!r} changed shape or disappeared while the write streamed.",
                        reason="ARCHITECTURE_CHANGED",
                        field="chunks",
                    )
            number = resident.revision + 1
            manifest = Manifest(
                layer_count=current.layer_count,
                variables=tuple(self._written.get(v.path, v) for v in current.variables),
            )
            changed = [v.path for v in current.variables if v.path in self._written]
            record = RevisionRecord(
                model_id=resident.model_id,
                revision=number,
                create_time=utc_now(),
                author=self._author,
                message=self._message,
                kind="write_weights",
                summary=f"wrote {len(changed)} variable(s), {self._staged.stored_bytes} bytes",
                architecture_changed=False,
                architecture_revision=resident.state.revision.architecture_revision,
                stored_bytes=self._staged.stored_bytes,
                changed_variables=changed,
            )
            self._staged.commit(record, manifest, None)
            committed = self._registry.store.read_manifest(resident.model_id, number)
            resident.install(record, committed, self._values)
        log.info("model %s: revision %d, %s", resident.model_id, number, record.summary)
        return record

    def abort(self) -> None:
        """Drop everything staged: the model stays exactly as it was."""
        for pending in self._disk:
            try:
                pending.result()
            except OSError:
                log.exception("writing a discarded tensor failed")
        if self._writer is not None:
            self._writer.discard()
            self._writer = None
        self._staged.discard()


async def write_weights(
    registry: Registry,
    model_id: str,
    *,
    expected_revision: int | None,
    message: str,
    allow_non_finite: bool,
    author: str,
    chunks: AsyncIterator[ChunkView],
) -> RevisionRecord:
    """Run one WriteWeights stream to its commit; on any failure nothing changes."""
    write = await registry.run(
        lambda: WeightWrite(
            registry,
            model_id,
            expected_revision=expected_revision,
            message=message,
            allow_non_finite=allow_non_finite,
            author=author,
        )
    )
    try:
        async for chunk in chunks:
            # A chunk is checked and copied in well under a millisecond: doing it
            # here saves a thread hop per chunk; the disk work is on its thread.
            write.add(chunk.name, chunk.dtype, chunk.shape, chunk.offset, chunk.data)
        return await registry.run(write.commit)
    except BaseException:
        # Also on cancellation (the client went away): undo synchronously, since a
        # cancelled task should not await again.
        write.abort()
        raise
