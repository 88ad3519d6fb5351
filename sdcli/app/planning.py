"""Every output of a run, planned and checked together before any model is loaded: the images (every name the
template gives), the latent files, the live preview, and whatever else a command writes (a grid, a report: they
register with `OutputPlan.add`). Found here, a bad plan costs nothing; found after the render, it costs the render
and leaves half of the outputs written.

The checks, in order (usage errors, exit 2, before any look at the disk):
- binary output never goes to a terminal (`-o -` with stdout not redirected: curl refuses it too);
- stdout carries one stream: one binary output (`-o -` or `--latent-out -`, one image), and never binary and
  text together (`--json`'s lines);
- no two outputs share a name, whatever their kinds (`--preview X -o X`, a latent name without {index} for
  several images);
then each target through outputs.check_target (exit 7: an existing file without --overwrite, a folder, a device,
a name too long). An existing --preview file that an earlier run wrote (its PNG marked as a preview) is replaced.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sdcli.runtime.errors import UsageError
from sdcli.output.targets import STDOUT, as_path, check_target, image_format

# What the kinds are called in messages (one, several); a kind not listed is shown as given.
_WHAT = {"image": ("image", "images"), "latent": ("latent file (--latent-out)", "latent files (--latent-out)"),
         "preview": ("live preview (--preview)", "live previews"), "embedding": ("embedding file", "embedding files")}
_HINTS = {"image": "add {index} or {seed} to the -o template",
          "latent": "add {index} or {seed} to the --latent-out template"}


@dataclass(frozen=True)
class Output:
    kind: str  # image | latent | preview | grid | report | ...
    path: Path  # Path("-"): stdout


@dataclass
class OutputPlan:
    """The outputs of one run. `add` each one (or `add_all`), say whether --json prints on stdout, then `check`."""

    overwrite: bool = False
    json_stdout: bool = False  # --json: result lines (text) on stdout
    formats: bool = False  # images are written in the format their extension names (targets.image_format)
    outputs: list[Output] = field(default_factory=list)

    def add(self, kind: str, path: str | Path) -> Path:
        """Register one output; returns its path (Path('-') for stdout)."""
        path = Path(STDOUT) if str(path) == STDOUT else as_path(path)
        self.outputs.append(Output(kind, path))
        return path

    def check(self) -> None:
        """Refuse the plan before any work: stdout shared, names colliding (exit 2); then each target (exit 7)."""
        self._check_stdout()
        self._check_collisions()
        for out in self.outputs:
            if str(out.path) != STDOUT:
                check_target(out.path, self.overwrite or (out.kind == "preview" and _own_preview(out.path)))
                if self.formats and out.kind == "image":
                    image_format(out.path)  # exit 2: an extension that names no format we write

    def _check_stdout(self) -> None:
        on_stdout = [o for o in self.outputs if str(o.path) == STDOUT]
        if not on_stdout:
            return
        kinds = {o.kind for o in on_stdout}
        if _terminal(sys.stdout):  # PNG or latent bytes would garble the terminal, and the output is lost
            raise UsageError(f"the {_what(on_stdout[0].kind)} goes to stdout (-), which is a terminal: redirect it "
                             "(> FILE, or | a viewer) or give a file name")
        if "preview" in kinds:  # rewritten while sampling: a stream of PNGs is no file a viewer can show
            raise UsageError("--preview is a file rewritten while sampling; it cannot go to stdout (-)")
        if len(on_stdout) > 1 and kinds == {"image"}:
            raise UsageError(f"-o - writes one PNG to stdout, but this run makes {len(on_stdout)} images; "
                             "use a template")
        if len(on_stdout) > 1:
            names = " and ".join(sorted({_what(o.kind) for o in on_stdout}))
            raise UsageError(f"stdout can carry one output, but this run would write {len(on_stdout)} there "
                             f"({names}); write all but one to files")
        if self.json_stdout:
            raise UsageError(f"the {_what(on_stdout[0].kind)} goes to stdout (-), and --json prints its lines "
                             "there too: write the output to a file, or drop --json")

    def _check_collisions(self) -> None:
        seen: dict[str, Output] = {}
        folders: dict[Path, str] = {}  # the images of a run share a folder or a few: each resolved once
        for out in self.outputs:
            if str(out.path) == STDOUT:
                continue
            key = _identity(out.path, folders)
            first = seen.setdefault(key, out)
            if first is out:
                continue
            if first.kind == out.kind:
                hint = _HINTS.get(out.kind, "give each a different name")
                raise UsageError(f"two {_what(out.kind, plural=True)} would be written to {out.path}: {hint}")
            raise UsageError(f"the {_what(out.kind)} and the {_what(first.kind)} would both be written to "
                             f"{out.path}: give them different names")


def _own_preview(path: Path) -> bool:
    """A preview file an earlier run wrote (marked so): a scratch file, replaced without --overwrite."""
    from sdcli.output.metadata import is_preview_file

    return path.is_file() and not path.is_symlink() and is_preview_file(path)


def _terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _what(kind: str, plural: bool = False) -> str:
    one, several = _WHAT.get(kind, (kind, kind + "s"))
    return several if plural else one


def _identity(path: Path, folders: dict[Path, str]) -> str:
    """One spelling per file: './a.png', 'a.png' and 'x/../a.png' are the same target (folders' symbolic links
    resolved; a link as the target itself is refused by check_target anyway). `folders`: the resolved folders
    so far."""
    parent = path.parent
    real = folders.get(parent)
    if real is None:
        real = folders[parent] = os.path.realpath(parent)
    return os.path.join(real, path.name)
