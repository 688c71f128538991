"""A run's workspace when runs are spread over hosts, and what it shares with the others.

A deployment's flow run works in its own clone of the project's git repository: the pull steps
of prefect.yaml make it, in a directory that the worker removes when the run ends. No two runs
share a ``params.yaml``, a ``dvc.lock``, an output or DVC's lock. What runs share, they share
through the tools:

- **A DVC cache per host** (``BIT_DVC_CACHE``, default ``~/.cache/bit-pipeline/dvc``). The runs on
  one host link their data and models to it rather than copying them, and its run cache restores
  a stage that another run computed with the same inputs instead of running it again.
- **A DVC remote for all hosts** (``BIT_DVC_REMOTE``: a directory on a shared file system,
  ``s3://bucket/path``, or any URL DVC supports). A run pushes what it produced there together
  with the run cache, so that other hosts restore it too.
- **The git remote the workspace was cloned from.** Each run is saved as a DVC experiment and
  pushed there (``dvc exp push``) once its data and models are on the DVC remote, so an
  experiment that can be listed can also be restored (``dvc exp pull`` and ``dvc exp apply``).

Both settings come from the worker's environment and go into the workspace's
``.dvc/config.local``, which git ignores. Remote credentials stay in the environment
(``AWS_ACCESS_KEY_ID`` and the like, read by DVC itself) or, when ``BIT_DVC_REMOTE`` carries a
``user:password@``, in ``.dvc/config.local`` only. Every message names the remote without its
credentials and quotes tool output through :func:`bit_core.redact.redact`.

Nothing here depends on Prefect: a workspace is a directory holding a git clone, so training that
spans several hosts can prepare its workspaces the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import chdir, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bit_core.contracts import CHECKPOINT
from bit_core.io import atomic_dir, atomic_path, atomic_write_json
from bit_core.redact import redact, split_credentials
from flows import dag
from tasks import environment

log = logging.getLogger(__name__)

REMOTE_ENV = "BIT_DVC_REMOTE"
CACHE_ENV = "BIT_DVC_CACHE"
REMOTE = "bit"  # the DVC remote's name in the workspace
GIT_REMOTE = "origin"  # where the workspace was cloned from
# Links from the host cache; a copy only where the file system allows no link.
LINKS = "reflink,hardlink,symlink,copy"
KEPT_DIR = "bit-resume"  # in the host cache and on the remote: <key>/<resume folder>
KEPT = "kept.json"  # in a kept resume folder: the training step its checkpoint was written at
USERINFO_SCHEMES = {"http", "https", "webdav", "webdavs", "ssh"}  # remotes that take user/password
BASIC_AUTH_SCHEMES = {"http", "https"}
REMOTE_FIX = (f"check {REMOTE_ENV} and the remote's credentials in the worker's environment "
              "(for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, and AWS_ENDPOINT_URL for an "
              "S3-compatible store)")


class WorkspaceError(RuntimeError):
    """A workspace cannot be prepared or shared; the message is one line, credentials redacted."""


@dataclass(frozen=True)
class Sharing:
    """What a workspace shares: the host's DVC cache and, when set, the DVC remote's URL."""

    cache: Path
    remote: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Sharing:
        """BIT_DVC_CACHE (default: ~/.cache/bit-pipeline/dvc) and BIT_DVC_REMOTE (optional)."""
        cache = env.get(CACHE_ENV) or str(default_cache(env))
        return cls(Path(cache).expanduser().resolve(), env.get(REMOTE_ENV) or None)

    @property
    def remote_shown(self) -> str:
        """The remote's URL without credentials, for messages; "none" when there is none."""
        return split_credentials(self.remote)[0] if self.remote else "none"


def default_cache(env: Mapping[str, str] = os.environ) -> Path:
    """The host cache when BIT_DVC_CACHE is unset: bit-pipeline/dvc in the user's cache folder."""
    base = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "bit-pipeline" / "dvc"


def is_local(url: str) -> bool:
    """Whether a remote URL is a directory on this host (a path, or file://)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    return scheme in ("", "file") or len(scheme) == 1  # "C:" is a drive, not a scheme


def remote_options(url: str) -> dict[str, str]:
    """The DVC options of the remote at `url`: its URL without credentials, and the credentials
    it held as ``user``/``password`` (with basic auth for HTTP).

    Raises WorkspaceError for credentials in the URL of a remote that takes them elsewhere.
    """
    bare, credentials = split_credentials(url)
    scheme = urllib.parse.urlsplit(bare).scheme.lower()
    if is_local(bare):
        path = urllib.parse.urlsplit(bare).path if scheme == "file" else bare
        return {"url": str(Path(path).expanduser().resolve())}
    options = {"url": bare}
    if credentials is None:
        return options
    if scheme not in USERINFO_SCHEMES:
        raise WorkspaceError(
            f"{REMOTE_ENV}: a {scheme} remote ({bare}) takes its credentials from the worker's "
            "environment (for S3: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), not from the URL")
    user, password = credentials
    options["user"] = user
    if password is not None:
        options["password"] = password
    if scheme in BASIC_AUTH_SCHEMES:
        options["auth"] = "basic"
    return options


def prepare(root: str | Path, sharing: Sharing) -> None:
    """Make a fresh clone a workspace: its whole git history, the host cache and the remote
    configured, the remote checked (its run cache fetched). WorkspaceError in one line."""
    complete_history(root)
    configure(root, sharing)
    check_remote(root, sharing)


def complete_history(root: str | Path) -> None:
    """Fetch the history a shallow clone lacks (the deployments' git_clone step clones with
    ``--depth 1``). DVC's experiments need it: its git library drops a clone's shallow marker
    when it fetches an experiment, and a later ``dvc exp push`` then fails on the parent commit
    the clone never had ("unexpected error - b'<commit>'"). The history is the project's code
    alone (data and models live in DVC), so it is small."""
    if git(root, "rev-parse", "--is-shallow-repository").strip() == "true":
        git(root, "fetch", "--quiet", "--unshallow", GIT_REMOTE)


def configure(root: str | Path, sharing: Sharing) -> Path:
    """Write the host cache and the remote into `root`'s .dvc/config.local (mode 0600: it may
    hold the remote's password); other settings already there are kept. Returns its path."""
    from configobj import ConfigObj

    root = Path(root).resolve()
    path = root / ".dvc" / "config.local"
    config = ConfigObj(str(path) if path.is_file() else None)
    config.setdefault("core", {})
    config["core"]["site_cache_dir"] = str(root / ".dvc" / "tmp" / "site")  # goes with root
    config["cache"] = {**config.get("cache", {}), "dir": str(sharing.cache), "type": LINKS,
                       "shared": "group"}
    section = f'remote "{REMOTE}"'
    if sharing.remote:
        config["core"]["remote"] = REMOTE
        config[section] = remote_options(sharing.remote)
    elif config["core"].get("remote") == REMOTE:
        del config["core"]["remote"]
        config.pop(section, None)
    sharing.cache.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.chmod(0o600)
        config.filename = None
        tmp.write_text("\n".join(config.write()) + "\n")
    return path


def dvc(root: str | Path, *args: str) -> subprocess.CompletedProcess:
    """`dvc <args>` in `root`, its output captured."""
    return subprocess.run([environment.tool("dvc"), *args], cwd=root, env=environment.tool_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)


def _checked(root: str | Path, what: str, fix: str, *args: str) -> str:
    """`dvc <args>`'s standard output; WorkspaceError "<what> failed (<DVC's error>): <fix>"
    when it fails."""
    result = dvc(root, *args)
    if result.returncode != 0:
        reason = _last_error(f"{result.stdout}\n{result.stderr}")
        raise WorkspaceError(redact(f"{what} failed ({reason}): {fix}"))
    return result.stdout


def _last_error(output: str) -> str:
    """DVC's last error line, to quote in a message (the whole output's tail if none)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["no output"])[-1][:300]


def check_remote(root: str | Path, sharing: Sharing) -> None:
    """Fail in seconds with one line when the DVC remote is unusable; else fetch its run cache.

    A directory remote must exist: DVC would create a missing one, and a shared file system that
    is not mounted would then silently hold this host's data alone.
    """
    if not sharing.remote:
        return
    url = remote_options(sharing.remote)["url"]
    if is_local(url) and not Path(url).is_dir():
        raise WorkspaceError(
            f"DVC remote {url} is not a directory on this host: mount the shared file system "
            f"there or create it (mkdir -p {url}), or set {REMOTE_ENV} to another remote")
    fetch_run_cache(root, sharing)


def fetch_run_cache(root: str | Path, sharing: Sharing) -> None:
    """Bring the remote's run cache into the host cache: which stage, run with which inputs,
    produced which outputs (no data: only files under one byte are fetched with it)."""
    if sharing.remote:
        _checked(root, f"reading DVC remote {sharing.remote_shown}", REMOTE_FIX,
                 "fetch", "--run-cache", "--max-size", "1")


def push(root: str | Path, sharing: Sharing, *targets: str) -> None:
    """Push the outputs of `targets` (every stage when none) and the run cache to the remote."""
    if sharing.remote:
        _checked(root, f"pushing to DVC remote {sharing.remote_shown}", REMOTE_FIX,
                 "push", "--run-cache", *targets)


def share_run(root: str | Path, stage: str, sharing: Sharing) -> None:
    """Make a stage that just ran restorable on every host: record the run in the run cache
    (host cache), then push it and the stage's outputs to the remote.

    DVC records no run of a stage that has uncached outputs besides metrics and plots (such as
    a report kept in git), although its run cache holds them well: it stores them in the cache
    and restores them with the rest. Such runs are recorded here with DVC's own record, and the
    objects of those outputs are pushed with it, so ``dvc repro --pull`` restores the stage on
    any host.
    """
    from dvc.repo import Repo
    from dvc.stage.cache import _can_hash, _get_cache_hash, _get_stage_hash
    from dvc.stage.serialize import to_single_stage_lockfile

    failed, step = 0, f"recording the run of {stage}"
    try:
        with chdir(root), Repo(str(root)) as repo:  # DVC's API resolves paths from there
            found = _stage(repo, root, stage)
            if _can_hash(found):
                repo.stage_cache.save(found)  # a no-op when DVC recorded the run itself
                entry = (_get_stage_hash(found), _get_cache_hash(to_single_stage_lockfile(found)))
                if sharing.remote:
                    for objs in repo.stage_cache.get_used_objs([entry]).values():
                        failed += len(repo.cloud.push(objs).failed)
            if sharing.remote and not failed:  # what `dvc push --run-cache <stage>` does
                step = f"pushing {stage} to DVC remote {sharing.remote_shown}"
                repo.push(targets=[stage], run_cache=True)
    except Exception as err:  # noqa: BLE001 - DVC's own errors, one line
        raise WorkspaceError(redact(f"{step} failed ({err}): {REMOTE_FIX}")) from None
    if failed:
        raise WorkspaceError(f"pushing {stage} to DVC remote {sharing.remote_shown} failed "
                             f"({failed} files): {REMOTE_FIX}")


def status(root: str | Path, *stages: str) -> dict:
    """What DVC says changed in `root` for `stages` (every stage when none), as ``dvc status
    --json`` prints it, asked through DVC's API: {stage: [changes]}, {} when up to date."""
    from dvc.repo import Repo

    try:
        with chdir(root), Repo(str(root)) as repo:
            return repo.status(targets=list(stages) or None)
    except Exception as err:  # noqa: BLE001 - DVC's own errors, one line
        command = " ".join(("dvc status", *stages))
        raise WorkspaceError(redact(f"{command} in {root} failed ({err})")) from None


def _stage(repo, root: str | Path, name: str):
    """Stage `name` of `root`'s dvc.yaml, as DVC's API sees it (with its dvc.lock entry)."""
    return repo.stage.collect(f"{Path(root).resolve() / 'dvc.yaml'}:{name}")[0]


@dataclass(frozen=True)
class Restore:
    """What ``dvc repro`` will do with a stage: restore its outputs (`restored`) or run it; and
    its run-cache key (a hash of its command, its dependencies' contents, its parameters and
    its output paths), None when DVC cannot make one. True when the outputs will be restored."""

    restored: bool
    key: str | None = None

    def __bool__(self) -> bool:
        return self.restored


def restorable(root: str | Path, stage: str, pull: bool = False) -> Restore:
    """Whether ``dvc repro`` (``dvc repro --pull`` with `pull`) will restore the outputs of
    `stage` instead of running its command: DVC's run cache holds a run with its current inputs
    (or dvc.lock records one), and that run's outputs are in the host cache, after fetching them
    from the remote with `pull`. The stage's run-cache key comes with the answer, from the same
    walk of its dependencies.

    DVC decides this only inside ``dvc repro`` (and says so only in its log), so the same steps
    are taken here through its API; with `pull` the outputs are fetched now rather than by
    ``dvc repro``. Stages DVC cannot cache runs of (one with a ``persist`` output) and stages
    whose inputs are not all there yet answer False.
    """
    from dvc.repo import Repo
    from dvc.stage.cache import _can_hash
    from dvc.stage.serialize import to_single_stage_lockfile

    try:
        with chdir(root), Repo(str(root)) as repo, repo.lock:  # as `dvc repro` holds it
            found = _stage(repo, root, stage)
            if pull and not found.changed(True):  # dvc.lock's run, outputs missing: DVC pulls
                for objs in found.get_used_objs().values():  # them (the cached ones) and
                    repo.cloud.pull(objs)  # checks them out, falling back to the run cache
                if all(not out.changed_cache() for out in found.outs if out.use_cache):
                    return Restore(True)
            if not _can_hash(found):
                return Restore(False)
            locked = not found.changed_stage() and found.deps_cached() and \
                all(out.hash_info for out in found.outs)
            run = to_single_stage_lockfile(found) if locked else None  # the run dvc.lock records
            # The key from the hashes as a new run records them, which can differ from dvc.lock's
            # (file metadata, `1` for `1.0`); DVC's state database makes this hashing cheap.
            key = _run_key(found)
            run = run or repo.stage_cache._load(found)  # noqa: SLF001
            if not run:
                return Restore(False, key)
            cached = repo.stage_cache._create_stage(run, wdir=found.wdir)  # noqa: SLF001
            if pull:
                for objs in cached.get_used_objs().values():
                    repo.cloud.pull(objs)
            return Restore(cached.outs_cached(), key)
    except Exception as err:  # noqa: BLE001 - when in doubt, the stage runs
        log.debug("%s", redact(f"whether {stage} will be restored is unknown ({err})"))
        return Restore(False)


@contextmanager
def checkpoints_kept(root: str | Path, sharing: Sharing, stage: str, folders: list[str],
                     key: str | None = None) -> Iterator[None]:
    """Around a stage with resume folders (the fine-tune's ``--resume-dir``): a run stopped or
    failed leaves them in the host cache (``<cache>/bit-resume/<inputs>``) and on the DVC remote
    (``bit-resume/<inputs>``) instead of in its workspace, which goes with it; the next run of
    the stage with the same inputs, on this host or another, starts with them (the trainer
    resumes from a checkpoint it accepts). They are forgotten once the stage succeeds.

    Each kept copy records the step of its checkpoint (:data:`KEPT`), so a run starts with the
    further of the host's and the remote's copy, and a copy further than the remote's (its
    upload cut short by a cancel, say) goes to the remote then.

    The inputs are those of DVC's run cache (the stage's command, the contents of its
    dependencies, its parameters), so a commit that changes none of them keeps the checkpoint,
    as it keeps a finished run restorable (`key`, as :func:`restorable` found it, or worked
    out here); when DVC cannot tell them, the commit and params.yaml.
    """
    root = Path(root)
    key = (key or _inputs_key(root, stage) or hashlib.sha256(
        head(root).encode() + (root / "params.yaml").read_bytes()).hexdigest())[:16]
    store = sharing.cache / KEPT_DIR / key
    remote = _KeptRemotely(root, key) if sharing.remote else None
    for folder in folders:
        if remote:
            remote.newest(folder, store / folder)
        if _step(store / folder) is not None:
            shutil.rmtree(root / folder, ignore_errors=True)
            shutil.copytree(store / folder, root / folder)
    try:
        yield
    except BaseException:
        for folder in folders:
            if (root / folder / CHECKPOINT).is_file():  # else the kept one stays (a run that
                _keep(root, folder, store, remote)  # failed after training, say)
        raise
    shutil.rmtree(store, ignore_errors=True)
    for folder in folders if remote else []:
        remote.remove(folder)


def _inputs_key(root: Path, stage: str) -> str | None:
    """DVC's run-cache key of `stage` (a hash of its command, its dependencies' contents, its
    parameters and its output paths); None when DVC cannot make one (a dependency missing)."""
    from dvc.repo import Repo

    try:
        with chdir(root), Repo(str(root)) as repo, repo.lock:
            return _run_key(_stage(repo, root, stage))
    except Exception as err:  # noqa: BLE001 - the caller falls back to the commit and parameters
        log.warning(redact(f"the inputs of {stage} could not be hashed ({err}): its checkpoint "
                           "is kept under the commit and params.yaml instead"))
        return None


def _run_key(found) -> str | None:
    """The run-cache key of DVC stage `found` from its dependencies as they are now (hashed
    once each, and saved on it); None when one is missing."""
    from dvc.stage.cache import _get_cache_hash
    from dvc.stage.serialize import to_single_stage_lockfile

    found.save_deps()
    if not all(dep.hash_info for dep in found.deps):
        return None
    return _get_cache_hash(to_single_stage_lockfile(found), key=True)


def _hand_over(folder: Path, kept: Path) -> None:
    """Move `folder` to `kept`, replacing what was there all at once: a rename where one file
    system holds both, else a copy (which a kill may cut short: the old `kept` then stays; the
    workspace, with `folder`, goes with the run)."""
    with atomic_dir(kept) as staged:
        try:
            os.replace(folder, staged)  # onto the empty staging folder
        except OSError:  # another file system
            shutil.copytree(folder, staged, dirs_exist_ok=True)


def _keep(root: Path, folder: str, store: Path, remote: _KeptRemotely | None) -> None:
    """Hand a stopped run's resume folder over to the host cache, then to the remote; a failure
    is logged, so that the run's own error is the one reported."""
    try:
        (root / folder / KEPT).unlink(missing_ok=True)  # the record of the copy it started with
        _hand_over(root / folder, store / folder)  # first: after a cancel, time may be short
        _record_step(store / folder)  # (a run that finds no record reads the step itself)
        if remote:
            remote.upload(folder, store / folder)
    except Exception as err:  # noqa: BLE001 - see above
        log.warning(redact(f"keeping {folder} for the next run failed: {err}"))


def _step(folder: Path) -> int | None:
    """How far the checkpoint kept in `folder` got: the training step it was written at, as
    recorded (:data:`KEPT`) or read from it; -1 when neither can be read; None when `folder`
    holds no checkpoint."""
    if not (folder / CHECKPOINT).is_file():
        return None
    recorded = _recorded_step(lambda: (folder / KEPT).read_bytes())
    return recorded if recorded >= 0 else _record_step(folder)  # rare: costs a torch import


def _record_step(folder: Path) -> int:
    """Read the step of `folder`'s checkpoint and record it beside it; -1 when unreadable."""
    import torch

    try:  # mapped, not read: only the small record of what the file holds is loaded
        step = int(torch.load(folder / CHECKPOINT, map_location="cpu", weights_only=True,
                              mmap=True)["step"])
    except Exception:  # noqa: BLE001 - cut short, or not a checkpoint of ours
        step = -1
    atomic_write_json(folder / KEPT, {"step": step})
    return step


def _recorded_step(read) -> int:
    """The step in a :data:`KEPT` record (``read()`` gives its bytes); -1 when unreadable."""
    try:
        return int(json.loads(read())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


class _KeptRemotely:
    """The kept folders of one key on the DVC remote (``bit-resume/<key>/<folder>``). Best
    effort: a remote that fails here costs the next run its head start on another host, not its
    result, so each failure is logged, not raised."""

    def __init__(self, root: Path, key: str):
        self.root, self.key = root, key

    def _at(self, folder: str) -> tuple:
        """The remote's file system, and where on it `folder` is kept."""
        from dvc.repo import Repo

        with Repo(str(self.root)) as repo:
            remote = repo.cloud.get_remote()
        return remote.fs, remote.fs.join(remote.path, KEPT_DIR, self.key, folder)

    def newest(self, folder: str, local: Path) -> None:
        """Leave the further of the host's and the remote's copy in both: download the remote's
        when its checkpoint is of a later step (another host's run went on from this one's) and
        upload the host's when the remote has none or an earlier one (an upload that a cancel
        cut short). On a tie each keeps its own."""
        try:
            fs, there = self._at(folder)
            mine, theirs = _step(local), None
            if fs.exists(fs.join(there, CHECKPOINT)):  # uploaded last: the copy is whole
                theirs = _recorded_step(lambda: fs.cat_file(fs.join(there, KEPT)))
            if theirs is not None and (mine is None or theirs > mine):
                with atomic_dir(local) as staged:  # `local` appears whole or not at all
                    for path in fs.find(there):
                        target = staged / Path(fs.relpath(path, there))
                        target.parent.mkdir(parents=True, exist_ok=True)
                        fs.get_file(path, str(target))
                    got = _record_step(staged)  # the checkpoint's own step: another host's
                    if not (staged / CHECKPOINT).is_file():  # upload may have changed it since
                        raise WorkspaceError("its checkpoint went during the download")
                    if mine is not None and got <= mine:
                        raise WorkspaceError(f"the copy downloaded (step {got}) is not further "
                                             f"than this host's (step {mine})")
            elif mine is not None and (theirs is None or mine > theirs):
                self._put(fs, there, local)
        except Exception as err:  # noqa: BLE001 - see the class
            log.warning(redact(f"comparing {folder} with its copy on the DVC remote failed: "
                               f"{err}"))

    def upload(self, folder: str, local: Path) -> None:
        try:
            self._put(*self._at(folder), local)
        except Exception as err:  # noqa: BLE001 - see the class
            log.warning(redact(f"keeping {folder} on the DVC remote failed: {err}"))

    def remove(self, folder: str) -> None:
        try:
            fs, there = self._at(folder)
            if fs.exists(there):
                fs.rm(there, recursive=True)
        except Exception as err:  # noqa: BLE001 - see the class
            log.warning(redact(f"removing {folder} from the DVC remote failed: {err}"))

    @staticmethod
    def _put(fs, there: str, local: Path) -> None:
        """Replace the remote copy: the old one is removed first (no stale file stays beside
        the new ones) and the checkpoint goes last (a cut-short upload leaves none)."""
        if fs.exists(there):
            fs.rm(there, recursive=True)
        files = sorted((p for p in local.rglob("*") if p.is_file()),
                       key=lambda p: (p.name == CHECKPOINT, str(p)))
        for path in files:
            fs.put_file(str(path), fs.join(there, *path.relative_to(local).parts))


# --- experiments -------------------------------------------------------------------------------


def head(root: str | Path) -> str:
    """The commit checked out in `root`."""
    return git(root, "rev-parse", "HEAD").strip()


def git(root: str | Path, *args: str) -> str:
    """`git <args>` in `root`, its output; WorkspaceError with git's last line when it fails."""
    result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise WorkspaceError(redact(f"git {args[0]} in {root} failed: "
                                    f"{(result.stderr.strip() or 'no output').splitlines()[-1]}"))
    return result.stdout


def matching_experiment(root: str | Path) -> str | None:
    """The newest experiment on the git remote whose baseline is HEAD and whose parameters are
    the workspace's, or None. Its refs are fetched (not its data)."""
    _checked(root, f"fetching experiments from git remote {GIT_REMOTE}",
             f"check that git remote {GIT_REMOTE} is reachable", "exp", "pull", "--no-cache",
             GIT_REMOTE)
    rows = json.loads(_checked(root, "dvc exp show", "see the error", "exp", "show", "--json"))
    mine = next(row for row in rows if row["rev"] == "workspace")["data"]["params"]
    found = [(rev["data"].get("timestamp") or "", rev["name"])
             for row in rows if row["rev"] != "workspace"
             for experiment in row.get("experiments") or [] for rev in experiment["revs"]
             if rev.get("name") and (rev.get("data") or {}).get("params") == mine]
    return max(found)[1] if found else None


def restore_experiment(root: str | Path, name: str, sharing: Sharing) -> bool:
    """Bring experiment `name` into the workspace: its parameters, dvc.lock and metrics from git,
    its data and models from the DVC remote (``dvc exp pull`` then ``dvc exp apply``).

    An experiment pushed by a run without a DVC remote has its data in that run's host cache
    only (it went to git all the same). When ``dvc exp apply`` finds outputs in neither this
    host's cache nor the remote, the workspace is put back as it was (the fresh clone with the
    run's parameters) and False is returned rather than an error: the stages are then restored
    from the run cache or run. Called before any stage ran.
    """
    fix = f"check the DVC remote and git remote {GIT_REMOTE}"
    pull = ["exp", "pull", *([] if sharing.remote else ["--no-cache"]), GIT_REMOTE, name]
    _checked(root, f"pulling experiment {name}", fix, *pull)
    params = (Path(root) / "params.yaml").read_bytes()
    try:
        _checked(root, f"applying experiment {name}", fix, "exp", "apply", name)
    except WorkspaceError:  # back to the clone with the run's parameters, so that the stages
        git(root, "reset", "--quiet", "--hard")  # find their runs in the run cache (the
        git(root, "clean", "-fdq")  # experiment's dvc.lock would send DVC to its outputs)
        (Path(root) / "params.yaml").write_bytes(params)
        return False
    return True


def _uncommitted_results(root: str | Path) -> list[str]:
    """Files an experiment holds besides those git tracks: dvc.lock, DVC's .gitignores and the
    uncached outputs, ignored ones too, so that ``dvc exp apply`` restores every output DVC
    cannot."""
    declared = sorted({"dvc.lock", *dag.outputs(root, cached=False)})
    return git(root, "ls-files", "--others", "--", *declared, ":(glob)**/.gitignore").split("\n")[:-1]


def save_experiment(root: str | Path, name: str, message: str) -> str:
    """``dvc exp save -n <name> -m <message>`` with every result included; returns its commit."""
    include = [arg for path in _uncommitted_results(root) for arg in ("-I", path)]
    output = _checked(root, f"saving experiment {name}", "see the error", "exp", "save", "--json",
                      "-n", name, "-m", message, *include)
    return (json_output(output) or {}).get("ref") or ""


def push_experiment(root: str | Path, sharing: Sharing, name: str) -> None:
    """Data and models to the DVC remote first, then the experiment to the git remote: an
    experiment that can be listed can always be restored."""
    push(root, sharing)
    _checked(root, f"pushing experiment {name} to git remote {GIT_REMOTE}",
             f"check that git remote {GIT_REMOTE} is reachable and accepts pushes",
             "exp", "push", "--no-cache", GIT_REMOTE, name)


def json_output(output: str) -> dict | None:
    """The JSON object a `dvc ... --json` command printed (warnings may share the output)."""
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None
