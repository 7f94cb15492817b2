"""Writing BIDS-Derivatives: all of a run's files land together, atomically, or none do."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    Directory,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)



def source_prefix(source_file: str) -> str:
    """BIDS name of a source file without its suffix and extension.

    'sub-01_task-rest_run-1_bold.nii.gz' -> 'sub-01_task-rest_run-1'.
    """
    return os.path.basename(source_file).rsplit("_", 1)[0]


def inside(path: Path, root: Path) -> bool:
    """Whether ``path`` resolves to a location under ``root``."""
    return os.path.commonpath([path.resolve(), root.resolve()]) == str(root.resolve())


def _copy(src: str, dst: Path, compress: bool) -> None:
    """Copy src to dst, gzip-compressing it when asked, deterministically: the gzip header
    holds no time and no file name (dst is a temporary name that differs between runs)."""
    if compress:
        with open(src, "rb") as fin, open(dst, "wb") as raw, \
                gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1,
                              mtime=0) as fout:  # no name, no time: same data, same bytes
            shutil.copyfileobj(fin, fout, length=1 << 22)
    else:
        shutil.copyfile(src, dst)


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Remove temporary files that ``write_atomically`` left under ``root`` when its process
    was killed: those of this host whose process no longer runs (other hosts' and live
    processes' files may belong to parallel jobs writing into the same folder)."""
    host = socket.gethostname()
    removed = []
    for path in root.rglob(".*.tmp"):
        parts = path.name.rsplit(".", 3)  # '.<name>', host, pid, 'tmp'
        if len(parts) != 4 or parts[1] != host or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def write_atomically(targets: dict[Path, object]) -> list[Path]:
    """Write several files so that either all appear or none do.

    targets: final path -> a source file path (str) to copy, or a dict to write as JSON, or a
    str content prefixed 'text:' to write verbatim. Each is first written to a hidden temporary
    file in its final directory, then all are renamed into place.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for final, content in targets.items():
            final.parent.mkdir(parents=True, exist_ok=True)
            # unique across processes and hosts: parallel jobs may share the output folder
            temp = final.parent / f".{final.name}.{socket.gethostname()}.{os.getpid()}.tmp"
            staged.append((temp, final))
            if isinstance(content, dict):
                temp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
            elif isinstance(content, str) and content.startswith("text:"):
                temp.write_text(content[len("text:"):])
            else:
                content = str(content)
                _copy(content, temp, final.name.endswith(".gz") and not content.endswith(".gz"))
        for temp, final in staged:
            os.replace(temp, final)
    except BaseException:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)
        raise
    return [final for _, final in staged]


class _WriteDerivativesInputSpec(BaseInterfaceInputSpec):
    base_directory = Directory(mandatory=True, desc="the derivatives (output) directory")
    bids_dir = Directory(exists=True, mandatory=True, desc="the input BIDS dataset")
    source_file = File(exists=True, mandatory=True, desc="the BIDS file the outputs derive from")
    in_files = traits.List(File(exists=True), mandatory=True, desc="files to write")
    names = traits.List(traits.Str, mandatory=True,
                        desc="for each file, its name after the source entities, e.g. "
                             "'desc-preproc_bold.nii.gz' (a .nii source is gzipped)")
    in_figures = traits.List(File(exists=True), value=[], usedefault=True,
                             desc="figures for sub-<label>/figures/")
    figure_names = traits.List(traits.Str, value=[], usedefault=True,
                               desc="for each figure, its name without extension")
    sidecars = traits.Dict(traits.Str, traits.Dict, value={}, usedefault=True,
                           desc="name -> metadata to write as JSON beside the files")


class _WriteDerivativesOutputSpec(TraitedSpec):
    out_files = traits.List(File(exists=True))


class WriteDerivatives(SimpleInterface):
    """Write a run's derivatives with BIDS names derived from the source file, all at once.

    The output mirrors the source's folders (``sub-X/[ses-Y/]func``); figures go to
    ``sub-X/figures``. Nothing is written outside ``base_directory``.
    """

    input_spec = _WriteDerivativesInputSpec
    output_spec = _WriteDerivativesOutputSpec
    # Outputs must reappear even when the node is cached and the output folder was emptied.
    _always_run = True

    def _run_interface(self, runtime):
        base = Path(self.inputs.base_directory)
        source = Path(self.inputs.source_file)
        relative = Path(os.path.relpath(source.parent, self.inputs.bids_dir))
        prefix = source_prefix(str(source))
        subject_dir = base / relative.parts[0]
        targets: dict[Path, object] = {}
        if len(self.inputs.in_files) != len(self.inputs.names) or \
                len(self.inputs.in_figures) != len(self.inputs.figure_names):
            raise ValueError("WriteDerivatives: each file needs exactly one name")
        for name, path in zip(self.inputs.names, self.inputs.in_files):
            targets[base / relative / f"{prefix}_{name}"] = path
        for name, metadata in self.inputs.sidecars.items():
            targets[base / relative / f"{prefix}_{name}"] = metadata
        for name, path in zip(self.inputs.figure_names, self.inputs.in_figures):
            extension = "".join(Path(path).suffixes[-1:])
            targets[subject_dir / "figures" / f"{prefix}_{name}{extension}"] = path
        for final in targets:
            if not inside(final, base):
                raise ValueError(f"{final}: refusing to write outside {base}")
        self._results["out_files"] = [str(p) for p in write_atomically(targets)]
        return runtime
