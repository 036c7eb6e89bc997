"""Fake `kind` (v0.29.0), `docker` (28.5 CLI) and `helm` (v3.19.0) for the test suite.

The executables in ``tests/fakes/bin`` call :func:`main` through ``launch.py`` (in a child of
the warm fake server, ``warmfakes.py``, when the test session runs one). Messages, argument
shapes and exit codes follow the upstream sources (kind ``pkg/cmd/kind``, helm ``cmd/helm`` +
``pkg/action``, docker ``cli/command``). All state is JSON under ``$LAB_FAKE_STATE`` (required,
exit 2 without it), guarded by an fcntl lock and written atomically:

``calls.jsonl``      one line per invocation, appended first: {tool, argv, time, pid, cwd, env}
``kind.json``        {"clusters": {NAME: {status creating|running|failed, config_text, config,
                     image, nodes: [{name, role, image, ipv4, ipv6, id, port_mappings}], ...}}}
                     kind clusters *are* the docker fake's containers
``docker.json``      {"down": bool, "info": {...overrides}, "version": {...Server overrides},
                     "networks": {NAME: {...overrides} | null}, "kind_network_exists": bool
                     (default true; kind create sets it), "exec": [{"container", "match" (regex
                     on the command), "stdout", "stderr", "code"}], "containers_state": {NAME:
                     "exited"}, "host_ports_in_use": ["0.0.0.0:80/TCP", ...]}
``helm.json``        {KUBE_CONTEXT: {"NS/RELEASE": {name, namespace, revision, status, chart,
                     version, values, ..., "history": [per-revision records]}}}
``helm-repos.json``  {NAME: {name, url}}
``apiservers.json``  {CLUSTER: "http://127.0.0.1:PORT"}: the server kind writes in kubeconfigs
                     (else $LAB_FAKE_KUBE_URL, else networking.apiServerPort, else :6443)
``charts/<chart>/``  *.yaml / templates/*.yaml objects helm applies to the API server on a
                     successful install/upgrade (Chart.yaml gives version/appVersion, values.yaml
                     the defaults for ``get values --all``)

Injection: ``LAB_FAKE_FAIL=tool:sub[,...]`` or ``fail.json`` {"tool:sub": {"stderr", "stdout",
"code", "times"}} (keys ``tool:sub1 sub2``, ``tool:sub1``, ``tool:*``; ``times`` is decremented,
absent = always); ``LAB_FAKE_SLEEP=tool:sub=SECONDS,...`` or ``sleep.json``: kind create sleeps
with the cluster recorded "creating", helm upgrade/install with the release "pending-*"; each
sleep, once begun, is announced in ``sleeping.jsonl`` (tests wait with ``wait_until_sleeping``);
``LAB_FAKE_DOCKER_DOWN=1`` (or docker.json "down") breaks every daemon call, kind included.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import os
import re
import sys
import time

# Each fake call is a fresh interpreter (~1,700 a run): typing, ipaddress and base64 stay out of
# its start (~5 ms); ipaddress is imported where an address is computed.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

FAKES_DIR = os.path.dirname(os.path.abspath(__file__))
BIN_DIR = os.path.join(FAKES_DIR, "bin")
STATE_ENV = "LAB_FAKE_STATE"

KIND_VERSION = "v0.29.0"
KIND_GO = "go1.24.2"
KIND_DEFAULT_IMAGE = ("kindest/node:v1.33.1@sha256:"
                      "050072256b9a903bd914c0b2866828150cb229cea0efe5892e2b644d5dd3b34f")
KIND_CLUSTER_LABEL = "io.x-k8s.kind.cluster"
KIND_ROLE_LABEL = "io.x-k8s.kind.role"

HELM_VERSION = "v3.19.0"
HELM_COMMIT = "3d8990f0836691f0229297773f3524598f46bda6"
HELM_GO = "go1.24.7"

DOCKER_VERSION = "28.5.2"
DOCKER_API = "1.51"
DOCKER_GO = "go1.24.9"
DOCKER_DOWN_MSG = ("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
                   "Is the docker daemon running?")

DEFAULT_KUBE_URL = "https://127.0.0.1:6443"
# base64 of a PEM certificate and an RSA key whose bodies are base64 of "FAKE-CERT-LAB-FAKES"
# and "FAKE-KEY-LAB-FAKES"
DUMMY_PEM = ("LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tClJrRkxSUzFEUlZKVUxVeEJRaTFHUVV0RlV3PT0KLS0tLS1F"
             "TkQgQ0VSVElGSUNBVEUtLS0tLQo=")
DUMMY_KEY = ("LS0tLS1CRUdJTiBSU0EgUFJJVkFURSBLRVktLS0tLQpSa0ZMUlMxTFJWa3RURUZDTFVaQlMwVlQKLS0tLS1F"
             "TkQgUlNBIFBSSVZBVEUgS0VZLS0tLS0K")


# ================================================================================================
# process plumbing
# ================================================================================================


class Exit(Exception):
    """Terminate the fake with ``code`` after writing ``stderr``/``stdout``."""

    def __init__(self, code: int, stderr: str = "", stdout: str = "") -> None:
        super().__init__(stderr)
        self.code = code
        self.stderr = stderr
        self.stdout = stdout


def out(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def err(text: str = "", end: str = "\n") -> None:
    sys.stderr.write(text + end)
    sys.stderr.flush()


class State:
    """JSON files under ``$LAB_FAKE_STATE`` guarded by one fcntl lock (re-entrant per process)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._depth = 0
        self._fd: int | None = None

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    @contextlib.contextmanager
    def locked(self) -> Iterator[State]:
        if self._depth == 0:
            os.makedirs(self.root, exist_ok=True)
            self._fd = os.open(self.path(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            if self._depth == 0 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None

    def read(self, name: str, default: Any = None) -> Any:
        try:
            with open(self.path(name), encoding="utf-8") as fh:
                text = fh.read()
        except FileNotFoundError:
            return copy.deepcopy(default)
        if not text.strip():
            return copy.deepcopy(default)
        return json.loads(text)

    def write(self, name: str, data: Any) -> None:
        write_atomic(self.path(name), json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:  # rename is atomic; no fsync (tests, not disks)
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    """One JSON line, in a single O_APPEND write: lines of concurrent fakes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


SLEEPING = "sleeping.jsonl"  # one line per fake call that entered its injected sleep


def log_call(state_dir: str, tool: str, argv: list[str]) -> None:
    env = {"KUBECONFIG": os.environ.get("KUBECONFIG")}
    for k in ("KIND_CLUSTER_NAME", "HELM_KUBECONTEXT", "HELM_NAMESPACE", "DOCKER_HOST",
              "KIND_EXPERIMENTAL_DOCKER_NETWORK", "LAB_FAKE_FAIL", "LAB_FAKE_SLEEP"):
        if k in os.environ:
            env[k] = os.environ[k]
    os.makedirs(state_dir, exist_ok=True)
    append_jsonl(os.path.join(state_dir, "calls.jsonl"),
                 {"tool": tool, "argv": argv, "time": time.time(), "pid": os.getpid(),
                  "cwd": os.getcwd(), "env": env})


def injection_keys(tool: str, path: list[str]) -> list[str]:
    keys = []
    if len(path) >= 2:
        keys.append(f"{tool}:{path[0]} {path[1]}")
    if path:
        keys.append(f"{tool}:{path[0]}")
    keys.append(f"{tool}:*")
    return keys


def injected_failure(state: State, keys: list[str]) -> dict[str, Any] | None:
    """The failure spec for this call, if one is injected (env LAB_FAKE_FAIL or fail.json)."""
    env = [e.strip() for e in os.environ.get("LAB_FAKE_FAIL", "").split(",") if e.strip()]
    for k in keys:
        if k in env:
            return {"code": 1, "key": k}
    if not os.path.exists(state.path("fail.json")):
        return None
    with state.locked():
        table = state.read("fail.json", {})
        for k in keys:
            spec = table.get(k)
            if spec is None or spec is False:
                continue
            spec = {} if not isinstance(spec, dict) else spec
            times = spec.get("times")
            if times is not None:
                if int(times) <= 0:
                    continue
                spec["times"] = int(times) - 1
                table[k] = spec
                state.write("fail.json", table)
            return {**spec, "key": k}
    return None


def injected_sleep(state: State, keys: list[str]) -> float:
    table: dict[str, float] = {}
    for item in os.environ.get("LAB_FAKE_SLEEP", "").split(","):
        if "=" in item:
            k, _, v = item.strip().rpartition("=")
            with contextlib.suppress(ValueError):
                table[k.strip()] = float(v)
    if os.path.exists(state.path("sleep.json")):
        with contextlib.suppress(ValueError, OSError):
            for k, v in (state.read("sleep.json", {}) or {}).items():
                table.setdefault(k, float(v))
    for k in keys:
        if k in table:
            return table[k]
    return 0.0


def do_sleep(seconds: float) -> None:
    if seconds > 0:
        sys.stdout.flush()
        sys.stderr.flush()
        _signal_sleeping()
        time.sleep(seconds)


def _signal_sleeping() -> None:
    """Tell a waiting test the injected sleep began: whatever the fake records before it (a
    cluster "creating", a release "pending-*") is on disk now (`wait_until_sleeping`)."""
    append_jsonl(os.path.join(os.environ[STATE_ENV], SLEEPING),
                 {"tool": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                  "pid": os.getpid()})


def fail_with(spec: dict[str, Any], default_stderr: str, default_code: int = 1) -> Exit:
    stderr = spec.get("stderr")
    if stderr is None:
        stderr = default_stderr
    return Exit(int(spec.get("code", default_code) if spec.get("code") is not None
                    else default_code), stderr.rstrip("\n"), spec.get("stdout", ""))


def main(tool: str, argv: list[str]) -> int:
    state_dir = os.environ.get(STATE_ENV)
    if not state_dir:
        err(f"fake {tool}: ${STATE_ENV} is not set: this is a test double from "
            f"tests/fakes/bin; point {STATE_ENV} at a state directory (tests do this)")
        return 2
    log_call(state_dir, tool, argv)
    state = State(state_dir)
    if tool != "docker" and any(a in ("-h", "--help") for a in argv) and "--" not in argv:
        out(f"Usage: {tool} [command] (fake {tool} from tests/fakes: help is not emulated)")
        return 0
    handler = {"kind": kind_main, "docker": docker_main, "helm": helm_main}[tool]
    code = 0
    try:
        handler(state, argv)
    except Exit as e:
        if e.stdout:
            out(e.stdout, end="" if e.stdout.endswith("\n") else "\n")
        if e.stderr:
            err(e.stderr)
        code = e.code
    except BrokenPipeError:
        code = 141
    log_end(state_dir, code)
    return code


def log_end(state_dir: str, code: int) -> None:
    """``ends.jsonl``: when each call (by pid) finished, so tests can see calls overlap."""
    append_jsonl(os.path.join(state_dir, "ends.jsonl"),
                 {"pid": os.getpid(), "time": time.time(), "code": code})


# ================================================================================================
# argument parsing (a small pflag/cobra look-alike)
# ================================================================================================


class UsageError(Exception):
    pass


class Flag:
    def __init__(self, name: str, kind: str = "str", short: str | None = None,
                 noopt: str | None = None, default: Any = None) -> None:
        self.name = name
        self.kind = kind  # bool | str | int | float | dur | array | slice | map
        self.short = short
        self.noopt = noopt
        self.default = default

    @property
    def display(self) -> str:
        return f"-{self.short}, --{self.name}" if self.short else f"--{self.name}"

    @property
    def takes_value(self) -> bool:
        return self.kind != "bool" and self.noopt is None


def F(spec: str, kind: str = "str", noopt: str | None = None, default: Any = None) -> Flag:
    """``F("namespace/n")`` → --namespace with shorthand -n."""
    name, _, short = spec.partition("/")
    return Flag(name, kind, short or None, noopt, default)


def parse_bool(flag: Flag, val: str) -> bool:
    v = val.lower()
    if v in ("1", "t", "true"):
        return True
    if v in ("0", "f", "false"):
        return False
    raise UsageError(f'invalid argument "{val}" for "{flag.display}" flag: '
                     f'strconv.ParseBool: parsing "{val}": invalid syntax')


GO_DUR_RE = re.compile(r"^([0-9]*(\.[0-9]*)?(ns|us|µs|ms|s|m|h))+$")
GO_DUR_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0,
                "h": 3600.0}


def parse_go_duration(val: str) -> float:
    s = val.lstrip("+-")
    if s == "0":
        return 0.0
    if not GO_DUR_RE.match(s):
        raise ValueError(f'time: invalid duration "{val}"')
    total = 0.0
    for num, _, unit in re.findall(r"([0-9]*(\.[0-9]*)?)(ns|us|µs|ms|s|m|h)", s):
        total += float(num or 0) * GO_DUR_UNITS[unit]
    return -total if val.startswith("-") else total


def format_go_duration(seconds: float) -> str:
    if seconds == 0:
        return "0s"
    h, rem = divmod(round(seconds), 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m}m{s}s"
    if m:
        return f"{m}m{s}s"
    return f"{s}s"


def set_flag(opts: dict[str, Any], flag: Flag, val: Any, changed: set[str]) -> None:
    changed.add(flag.name)
    k = flag.kind
    if k == "bool":
        opts[flag.name] = val if isinstance(val, bool) else parse_bool(flag, val)
    elif k == "int":
        try:
            opts[flag.name] = int(val)
        except ValueError:
            raise UsageError(f'invalid argument "{val}" for "{flag.display}" flag: '
                             f'strconv.ParseInt: parsing "{val}": invalid syntax') from None
    elif k == "float":
        try:
            opts[flag.name] = float(val)
        except ValueError:
            raise UsageError(f'invalid argument "{val}" for "{flag.display}" flag: '
                             f'strconv.ParseFloat: parsing "{val}": invalid syntax') from None
    elif k == "dur":
        try:
            parse_go_duration(val)
        except ValueError as e:
            raise UsageError(f'invalid argument "{val}" for "{flag.display}" flag: {e}') from None
        opts[flag.name] = val
    elif k == "array":
        opts.setdefault(flag.name, []).append(val)
    elif k == "slice":
        opts.setdefault(flag.name, []).extend(p for p in val.split(",") if p != "")
    elif k == "map":
        m = opts.setdefault(flag.name, {})
        for part in val.split(","):
            if "=" not in part:
                raise UsageError(f'invalid argument "{val}" for "{flag.display}" flag: '
                                 f"{part} must be formatted as key=value")
            a, _, b = part.partition("=")
            m[a] = b
    else:
        opts[flag.name] = val


def parse_flags(args: list[str], flags: list[Flag], interspersed: bool = True
                ) -> tuple[dict[str, Any], list[str], set[str]]:
    by_long = {f.name: f for f in flags}
    by_short = {f.short: f for f in flags if f.short}
    opts: dict[str, Any] = {}
    for f in flags:
        if f.default is not None:
            opts[f.name] = copy.deepcopy(f.default)
        elif f.kind == "bool":
            opts[f.name] = False
        elif f.kind in ("array", "slice"):
            opts[f.name] = []
        elif f.kind == "map":
            opts[f.name] = {}
        else:
            opts[f.name] = None
    changed: set[str] = set()
    pos: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            pos.extend(args[i + 1:])
            break
        if a.startswith("--"):
            name, eq, val = a[2:].partition("=")
            fl = by_long.get(name)
            if fl is None:
                raise UsageError(f"unknown flag: --{name}")
            if eq:
                set_flag(opts, fl, val, changed)
            elif fl.kind == "bool":
                set_flag(opts, fl, True, changed)
            elif fl.noopt is not None:
                set_flag(opts, fl, fl.noopt, changed)
            else:
                if i + 1 >= len(args):
                    raise UsageError(f"flag needs an argument: --{name}")
                i += 1
                set_flag(opts, fl, args[i], changed)
        elif a.startswith("-") and a != "-":
            j = 1
            while j < len(a):
                c = a[j]
                fl = by_short.get(c)
                if fl is None:
                    raise UsageError(f"unknown shorthand flag: '{c}' in {a}")
                rest = a[j + 1:]
                if fl.kind == "bool":
                    if rest.startswith("="):
                        set_flag(opts, fl, rest[1:], changed)
                        break
                    set_flag(opts, fl, True, changed)
                    j += 1
                    continue
                if rest.startswith("="):
                    rest = rest[1:]
                if rest:
                    set_flag(opts, fl, rest, changed)
                elif fl.noopt is not None:
                    set_flag(opts, fl, fl.noopt, changed)
                else:
                    if i + 1 >= len(args):
                        raise UsageError(f"flag needs an argument: '{c}' in -{c}")
                    i += 1
                    set_flag(opts, fl, args[i], changed)
                break
        else:
            if not interspersed:
                pos.extend(args[i:])
                break
            pos.append(a)
        i += 1
    return opts, pos, changed


def split_command(args: list[str], tree: dict[str, Any], value_flags: set[str]
                  ) -> tuple[list[str], list[str]]:
    """Find the (sub)command words in ``args`` (cobra-style: flags may come first).

    ``tree`` maps command names to sub-trees (``None`` for leaves). Returns (path, rest).
    """
    path: list[str] = []
    rest: list[str] = []
    node: Any = tree
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest.extend(args[i:])
            break
        if a.startswith("-") and a != "-":
            rest.append(a)
            if "=" not in a and a in value_flags and i + 1 < len(args):
                rest.append(args[i + 1])
                i += 1
            i += 1
            continue
        if isinstance(node, dict) and a in node:
            path.append(a)
            node = node[a]
        elif isinstance(node, dict) and node.get("__aliases__", {}).get(a):
            canonical = node["__aliases__"][a]
            path.append(canonical)
            node = node[canonical]
        elif isinstance(node, dict) and not path:
            # unknown top-level command
            path.append(a)
            node = None
        else:
            rest.append(a)
        i += 1
    return path, rest


def value_flag_tokens(flags: list[Flag]) -> set[str]:
    toks: set[str] = set()
    for f in flags:
        if f.takes_value:
            toks.add(f"--{f.name}")
            if f.short:
                toks.add(f"-{f.short}")
    return toks


def shell_quote(s: str) -> str:
    """shellescape.Quote, as kind uses to print commands."""
    if s == "":
        return "''"
    if re.search(r"[^\w@%+=:,./-]", s, re.ASCII) is None:
        return s
    return "'" + s.replace("'", "'\"'\"'") + "'"


# ================================================================================================
# a tiny Go text/template evaluator (enough for docker/helm --format / --template use)
# ================================================================================================


class GoStruct(dict):  # type: ignore[type-arg]
    """A dict that prints like a Go struct with %v (``{a b c}``), fields in ``go_fields`` order."""

    go_fields: tuple[tuple[str, Any], ...] = ()

    def __init__(self, data: dict[str, Any], go_fields: tuple[tuple[str, Any], ...]) -> None:
        super().__init__(data)
        self.go_fields = go_fields


class _NoValue:
    def __repr__(self) -> str:
        return "<no value>"


NOVALUE = _NoValue()


class TemplateError(Exception):
    pass


_TOKEN_RE = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)


def _tokenize_template(src: str) -> list[tuple[str, str]]:
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in _TOKEN_RE.finditer(src):
        text = src[pos:m.start()]
        if m.group(1):
            text = text.rstrip()
        parts.append(("text", text))
        parts.append(("action", m.group(2).strip()))
        pos = m.end()
        if m.group(3):
            rest = src[pos:]
            pos += len(rest) - len(rest.lstrip())
    parts.append(("text", src[pos:]))
    return parts


def _parse_template(tokens: list[tuple[str, str]], i: int = 0, stop: tuple[str, ...] = ()
                    ) -> tuple[list[Any], int, str]:
    nodes: list[Any] = []
    while i < len(tokens):
        kind, val = tokens[i]
        i += 1
        if kind == "text":
            if val:
                nodes.append(("text", val))
            continue
        if val.startswith("/*"):
            continue
        word = val.split(None, 1)[0] if val else ""
        if word in ("end", "else") and word in stop:
            return nodes, i, val
        if word in ("range", "with", "if"):
            expr = val[len(word):].strip()
            body, i, term = _parse_template(tokens, i, ("end", "else"))
            other: list[Any] = []
            if term.startswith("else"):
                other, i, term = _parse_template(tokens, i, ("end",))
            nodes.append((word, expr, body, other))
            continue
        nodes.append(("action", val))
    if stop:
        raise TemplateError("unexpected EOF")
    return nodes, i, ""


def _split_expr(expr: str) -> list[str]:
    toks: list[str] = []
    i = 0
    while i < len(expr):
        c = expr[i]
        if c.isspace():
            i += 1
        elif c in "\"`":
            j = i + 1
            while j < len(expr) and expr[j] != c:
                j += 2 if expr[j] == "\\" and c == '"' else 1
            toks.append(expr[i:j + 1])
            i = j + 1
        elif c in "()|":
            toks.append(c)
            i += 1
        else:
            j = i
            while j < len(expr) and not expr[j].isspace() and expr[j] not in "()|\"`":
                j += 1
            toks.append(expr[i:j])
            i = j
    return toks


def _lookup(value: Any, field: str) -> Any:
    if value is None:  # Go: field of a nil pointer is an execution error
        raise TemplateError(f"nil pointer evaluating .{field}")
    if value is NOVALUE:
        return NOVALUE
    if isinstance(value, dict):
        if field in value:
            return value[field]
        low = field.lower()
        for k in value:
            if isinstance(k, str) and k.lower() == low:
                return value[k]
        return NOVALUE
    return NOVALUE


def go_format(v: Any) -> str:
    if v is NOVALUE:
        return "<no value>"
    if v is None:
        return "<nil>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if v != int(v) else str(int(v))
    if isinstance(v, GoStruct):
        return "{" + " ".join(go_format(v.get(n, d)) for n, d in v.go_fields) + "}"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{go_format(v[k])}" for k in sorted(v)) + "]"
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(go_format(x) for x in v) + "]"
    return str(v)


def _to_json(v: Any) -> str:
    def conv(x: Any) -> Any:
        if x is NOVALUE:
            return None
        if isinstance(x, dict):
            return {k: conv(val) for k, val in x.items() if not callable(val)}
        if isinstance(x, (list, tuple)):
            return [conv(i) for i in x]
        return x
    return json.dumps(conv(v), separators=(",", ":"), ensure_ascii=False)


def _go_printf(fmt: str, *args: Any) -> str:
    it = iter(args)

    def rep(m: re.Match[str]) -> str:
        if m.group(0) == "%%":
            return "%"
        v = next(it, NOVALUE)
        verb = m.group(0)[-1]
        if verb == "q":
            return json.dumps(go_format(v))
        return go_format(v)
    return re.sub(r"%%|%[-+# 0-9.]*[vsdqtf]", rep, fmt)


TEMPLATE_FUNCS: dict[str, Callable[..., Any]] = {
    "json": _to_json,
    "index": lambda v, *keys: _index(v, *keys),
    "join": lambda v, sep: sep.join(go_format(x) for x in (v or [])),
    "printf": _go_printf,
    "print": lambda *a: "".join(go_format(x) for x in a),
    "println": lambda *a: " ".join(go_format(x) for x in a) + "\n",
    "len": lambda v: len(v) if v not in (None, NOVALUE) else 0,
    "lower": lambda v: go_format(v).lower(),
    "upper": lambda v: go_format(v).upper(),
    "title": lambda v: go_format(v).title(),
    "eq": lambda a, *b: any(a == x for x in b),
    "ne": lambda a, b: a != b,
    "not": lambda a: not _truthy(a),
    "and": lambda *a: next((x for x in a if not _truthy(x)), a[-1] if a else None),
    "or": lambda *a: next((x for x in a if _truthy(x)), a[-1] if a else None),
    "split": lambda s, sep: go_format(s).split(sep),
    "truncate": lambda s, n: go_format(s)[:int(n)],
    "pad": lambda s, a, b: " " * int(a) + go_format(s) + " " * int(b),
}


def _index(v: Any, *keys: Any) -> Any:
    for k in keys:
        if isinstance(v, dict):
            v = v.get(k, NOVALUE)
        elif isinstance(v, (list, tuple)) and isinstance(k, int) and 0 <= k < len(v):
            v = v[k]
        else:
            return NOVALUE
    return v


def _truthy(v: Any) -> bool:
    return not (v is NOVALUE or v is None or v is False or v == 0 or v == "" or
                (isinstance(v, (list, dict, tuple)) and len(v) == 0))


class _Ctx:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.vars: dict[str, Any] = {"$": root}


def _eval_term(tok: str, dot: Any, ctx: _Ctx) -> Any:
    if tok.startswith('"'):
        return json.loads(tok)
    if tok.startswith("`"):
        return tok[1:-1]
    if tok in ("true", "false"):
        return tok == "true"
    if tok == "nil":
        return None
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if re.fullmatch(r"-?\d+\.\d*", tok):
        return float(tok)
    if tok == ".":
        return dot
    if tok.startswith("$"):
        name, _, path = tok.partition(".")
        v = ctx.vars.get(name, NOVALUE)
        for f in path.split(".") if path else []:
            v = _lookup(v, f)
        return v
    if tok.startswith("."):
        v = dot
        for f in tok[1:].split("."):
            v = _lookup(v, f)
        return v
    raise TemplateError(f'function "{tok}" not defined')


def _eval_pipeline(toks: list[str], dot: Any, ctx: _Ctx) -> Any:
    # handle variable declarations:  $x := pipeline
    if len(toks) >= 2 and toks[0].startswith("$") and toks[1] in (":=", "="):
        v = _eval_pipeline(toks[2:], dot, ctx)
        ctx.vars[toks[0]] = v
        return ""
    cmds: list[list[Any]] = [[]]
    depth = 0
    group: list[str] = []
    for t in toks:
        if depth:
            if t == "(":
                depth += 1
            elif t == ")":
                depth -= 1
                if depth == 0:
                    cmds[-1].append(("group", group))
                    group = []
                    continue
            group.append(t)
        elif t == "(":
            depth = 1
        elif t == "|":
            cmds.append([])
        else:
            cmds[-1].append(t)
    result: Any = NOVALUE
    for n, cmd in enumerate(cmds):
        args = list(cmd)
        if n > 0:
            args.append(("value", result))
        result = _eval_command(args, dot, ctx)
    return result


def _eval_arg(a: Any, dot: Any, ctx: _Ctx) -> Any:
    if isinstance(a, tuple):
        return _eval_pipeline(a[1], dot, ctx) if a[0] == "group" else a[1]
    return _eval_term(a, dot, ctx)


def _eval_command(args: list[Any], dot: Any, ctx: _Ctx) -> Any:
    if not args:
        return NOVALUE
    head = args[0]
    if isinstance(head, str) and head in TEMPLATE_FUNCS:
        vals = [_eval_arg(a, dot, ctx) for a in args[1:]]
        try:
            return TEMPLATE_FUNCS[head](*vals)
        except TypeError as e:
            raise TemplateError(f"wrong number of args for {head}: {e}") from None
    v = _eval_arg(head, dot, ctx)
    if callable(v):
        return v(*[_eval_arg(a, dot, ctx) for a in args[1:]])
    if len(args) > 1:
        raise TemplateError(f"can't give argument to non-function {head}")
    return v


def _exec_nodes(nodes: list[Any], dot: Any, ctx: _Ctx, buf: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            buf.append(node[1])
        elif kind == "action":
            v = _eval_pipeline(_split_expr(node[1]), dot, ctx)
            if not (isinstance(node[1], str) and re.match(r"^\$\w*\s*:?=", node[1])):
                buf.append(go_format(v))
        else:
            _, expr, body, other = node
            toks = _split_expr(expr)
            loopvars: list[str] = []
            if kind == "range" and ":=" in toks:
                k = toks.index(":=")
                loopvars = [t.rstrip(",") for t in toks[:k]]
                toks = toks[k + 1:]
            v = _eval_pipeline(toks, dot, ctx)
            if kind == "if":
                _exec_nodes(body if _truthy(v) else other, dot, ctx, buf)
            elif kind == "with":
                if _truthy(v):
                    _exec_nodes(body, v, ctx, buf)
                else:
                    _exec_nodes(other, dot, ctx, buf)
            else:  # range
                if isinstance(v, dict):
                    items = [(k, v[k]) for k in sorted(v)]
                elif isinstance(v, (list, tuple)):
                    items = list(enumerate(v))
                else:
                    items = []
                if not items:
                    _exec_nodes(other, dot, ctx, buf)
                for k, item in items:
                    if len(loopvars) == 1:
                        ctx.vars[loopvars[0]] = item
                    elif len(loopvars) == 2:
                        ctx.vars[loopvars[0]] = k
                        ctx.vars[loopvars[1]] = item
                    _exec_nodes(body, item, ctx, buf)


def render_go_template(src: str, data: Any) -> str:
    nodes, _, _ = _parse_template(_tokenize_template(src))
    buf: list[str] = []
    _exec_nodes(nodes, data, _Ctx(data), buf)
    return "".join(buf)


# ================================================================================================
# YAML / kubeconfig helpers
# ================================================================================================


def yaml_mod() -> Any:
    """PyYAML, imported on first use: the fakes start with ``python3 -S`` (no site-packages,
    half the start-up time), so the site directories are added only when a call needs YAML."""
    try:
        import yaml
    except ImportError:
        import site

        site.main()
        import yaml
    return yaml


def yaml_dump(data: Any) -> str:
    yaml = yaml_mod()
    return str(yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                         default_flow_style=False, sort_keys=False, allow_unicode=True))


def yaml_load_all(text: str) -> Any:
    yaml = yaml_mod()
    return yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def yaml_load(text: str) -> Any:
    yaml = yaml_mod()
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def home_dir() -> str:
    return os.environ.get("HOME") or os.path.expanduser("~")


def kubeconfig_paths(explicit: str | None) -> list[str]:
    """kind's ``paths()``: explicit, else $KUBECONFIG list (deduplicated), else ~/.kube/config."""
    if explicit:
        return [explicit]
    seen: list[str] = []
    for p in os.environ.get("KUBECONFIG", "").split(os.pathsep):
        if p and p not in seen:
            seen.append(p)
    return seen or [os.path.join(home_dir(), ".kube", "config")]


def kubeconfig_merge_path(explicit: str | None) -> str:
    """kind's ``pathForMerge()``: the only path, else the first existing one, else the last."""
    paths = kubeconfig_paths(explicit)
    if len(paths) == 1:
        return paths[0]
    for p in paths:
        if os.path.exists(p):
            return p
    return paths[-1]


KUBECONFIG_CACHE = ".kubeconfig-cache.json"


def _kc_cache_path() -> str | None:
    root = os.environ.get(STATE_ENV)
    return os.path.join(root, KUBECONFIG_CACHE) if root else None


def _kc_cache(text: str, data: Any = None) -> Any:
    """Parsed kubeconfigs by content hash, so most calls need not import yaml (~12 ms)."""
    p = _kc_cache_path()
    if p is None:
        return None
    digest = sha256_hex(text.encode())
    try:
        with open(p, encoding="utf-8") as fh:
            cache = json.load(fh)
    except (OSError, ValueError):
        cache = {}
    if data is None:
        return cache.get(digest)
    cache.pop(digest, None)
    cache[digest] = data
    for k in list(cache)[:-16]:
        del cache[k]
    with contextlib.suppress(OSError):
        write_atomic(p, json.dumps(cache))
    return data


def read_kubeconfig(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        return {}
    if not text.strip():
        return {}
    data = _kc_cache(text)
    if data is None:
        data = yaml_load(text)
        if isinstance(data, dict):
            _kc_cache(text, data)
    return data if isinstance(data, dict) else {}


def write_kubeconfig(path: str, data: dict[str, Any]) -> None:
    text = yaml_dump(data)
    write_atomic(path, text, 0o600)
    _kc_cache(text, data)


def empty_kubeconfig() -> dict[str, Any]:
    return {"apiVersion": "v1", "clusters": [], "contexts": [], "current-context": "",
            "kind": "Config", "preferences": {}, "users": []}


def kind_kubeconfig(name: str, server: str) -> dict[str, Any]:
    key = f"kind-{name}"
    return {
        "apiVersion": "v1",
        "clusters": [{"cluster": {"certificate-authority-data": DUMMY_PEM, "server": server},
                      "name": key}],
        "contexts": [{"context": {"cluster": key, "user": key}, "name": key}],
        "current-context": key,
        "kind": "Config",
        "preferences": {},
        "users": [{"name": key, "user": {"client-certificate-data": DUMMY_PEM,
                                         "client-key-data": DUMMY_KEY}}],
    }


def _upsert(items: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    items = [i for i in (items or []) if isinstance(i, dict)]
    for n, i in enumerate(items):
        if i.get("name") == entry["name"]:
            items[n] = entry
            return items
    items.append(entry)
    return items


class KubeconfigLocked(Exception):
    """kind's lockFile(): ``<kubeconfig>.lock`` created with O_EXCL, no waiting
    (pkg/cluster/internal/kubeconfig/internal/kubeconfig/lock.go)."""


@contextlib.contextmanager
def kubeconfig_lock(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    lock = path + ".lock"
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL, 0)
    except FileExistsError:
        raise KubeconfigLocked(f"failed to lock config file: open {lock}: file exists") from None
    os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock)


def merge_kind_kubeconfig(path: str, name: str, server: str) -> None:
    with kubeconfig_lock(path):
        _merge_kind_kubeconfig(path, name, server)


def _merge_kind_kubeconfig(path: str, name: str, server: str) -> None:
    existing = read_kubeconfig(path) or empty_kubeconfig()
    kc = kind_kubeconfig(name, server)
    for section in ("clusters", "users", "contexts"):
        existing[section] = _upsert(existing.get(section) or [], kc[section][0])
    existing["current-context"] = kc["current-context"]
    for k in ("apiVersion", "kind"):
        existing.setdefault(k, kc[k])
    ordered = {k: existing[k] for k in ("apiVersion", "clusters", "contexts", "current-context",
                                        "kind", "preferences", "users") if k in existing}
    ordered.update({k: v for k, v in existing.items() if k not in ordered})
    write_kubeconfig(path, ordered)


def remove_kind_kubeconfig(paths: list[str], name: str) -> None:
    key = f"kind-{name}"
    for path in paths:
        if not os.path.exists(path):
            continue
        with kubeconfig_lock(path):
            _remove_from(path, key)


def _remove_from(path: str, key: str) -> None:
    cfg = read_kubeconfig(path)
    mutated = False
    for section in ("clusters", "users", "contexts"):
        items = cfg.get(section) or []
        kept = [i for i in items if not (isinstance(i, dict) and i.get("name") == key)]
        if len(kept) != len(items):
            cfg[section] = kept
            mutated = True
    if cfg.get("current-context") == key:
        cfg["current-context"] = ""
        mutated = True
    if mutated:
        write_kubeconfig(path, cfg)


def load_merged_kubeconfig(explicit: str | None) -> dict[str, Any]:
    """client-go style merge of every kubeconfig file: first definition of a name wins."""
    merged: dict[str, Any] = {"clusters": {}, "contexts": {}, "users": {}, "current-context": ""}
    for path in kubeconfig_paths(explicit):
        cfg = read_kubeconfig(path)
        if not merged["current-context"] and cfg.get("current-context"):
            merged["current-context"] = cfg["current-context"]
        for section, key in (("clusters", "cluster"), ("contexts", "context"), ("users", "user")):
            for item in cfg.get(section) or []:
                if isinstance(item, dict) and item.get("name") not in merged[section]:
                    merged[section][item.get("name")] = item.get(key) or {}
    return merged


# ================================================================================================
# shared "machine" model: kind clusters are docker containers on the kind network
# ================================================================================================


def docker_state(state: State) -> dict[str, Any]:
    return state.read("docker.json", {}) or {}


def docker_is_down(state: State) -> bool:
    if os.environ.get("LAB_FAKE_DOCKER_DOWN", "") not in ("", "0", "false"):
        return True
    return bool(docker_state(state).get("down"))


def kind_state(state: State) -> dict[str, Any]:
    data = state.read("kind.json", {}) or {}
    data.setdefault("clusters", {})
    data.setdefault("seq", 0)
    return data


def sha256_hex(data: bytes) -> str:
    try:  # the bare module loads in ~1 ms; hashlib pulls in OpenSSL (~4 ms per fake call)
        import _sha256

        return str(_sha256.sha256(data).hexdigest())
    except ImportError:
        import hashlib

        return hashlib.sha256(data).hexdigest()


def hexid(*parts: str) -> str:
    return sha256_hex("\0".join(parts).encode())


def default_network(name: str) -> dict[str, Any]:
    base = {
        "Name": name,
        "Id": hexid("network", name),
        "Created": "2025-01-01T00:00:00.000000000Z",
        "Scope": "local",
        "Driver": "bridge",
        "EnableIPv4": True,
        "EnableIPv6": False,
        "IPAM": {"Driver": "default", "Options": {}, "Config": []},
        "Internal": False,
        "Attachable": False,
        "Ingress": False,
        "ConfigFrom": {"Network": ""},
        "ConfigOnly": False,
        "Containers": {},
        "Options": {},
        "Labels": {},
    }
    if name == "kind":
        base["EnableIPv6"] = True
        base["IPAM"]["Config"] = [
            {"Subnet": "172.18.0.0/16", "Gateway": "172.18.0.1"},
            {"Subnet": "fc00:f853:ccd:e793::/64", "Gateway": "fc00:f853:ccd:e793::1"},
        ]
        base["Options"] = {"com.docker.network.bridge.enable_ip_masquerade": "true",
                           "com.docker.network.driver.mtu": "1500"}
    elif name == "bridge":
        base["IPAM"]["Config"] = [{"Subnet": "172.17.0.0/16", "Gateway": "172.17.0.1"}]
        base["Options"] = {"com.docker.network.bridge.default_bridge": "true",
                           "com.docker.network.bridge.name": "docker0"}
    elif name in ("host", "none"):
        base["Driver"] = "host" if name == "host" else "null"
    return base


def deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        res = dict(base)
        for k, v in over.items():
            res[k] = deep_merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return res
    return copy.deepcopy(over)


def network_defs(state: State, dstate: dict[str, Any] | None = None,
                 kstate: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every network the daemon has, without the Containers section filled in."""
    d = docker_state(state) if dstate is None else dstate
    k = kind_state(state) if kstate is None else kstate
    nets: dict[str, dict[str, Any]] = {n: default_network(n) for n in ("bridge", "host", "none")}
    overrides = d.get("networks") or {}
    kind_exists = bool(d.get("kind_network_exists", True)) or bool(k["clusters"]) or \
        overrides.get("kind") is not None
    if kind_exists:
        nets["kind"] = default_network("kind")
    for name, over in overrides.items():
        if over is None:
            nets.pop(name, None)
            continue
        if name == "kind" and not kind_exists:
            continue
        base = nets.get(name) or default_network(name)
        if "IPAM" in over and "Config" in (over.get("IPAM") or {}):
            base = dict(base)
            base["IPAM"] = dict(base["IPAM"], Config=[])
        nets[name] = deep_merge(base, over)
        nets[name]["Name"] = name
    return nets


def network_subnets(net: dict[str, Any]) -> tuple[Any, Any]:
    import ipaddress
    v4 = v6 = None
    for c in (net.get("IPAM") or {}).get("Config") or []:
        sub = c.get("Subnet")
        if not sub:
            continue
        n = ipaddress.ip_network(sub, strict=False)
        if n.version == 4 and v4 is None:
            v4 = n
        elif n.version == 6 and v6 is None:
            v6 = n
    if not net.get("EnableIPv6", False):
        v6 = None
    return v4, v6


def allocate_ips(kstate: dict[str, Any], net: dict[str, Any] | None, count: int
                 ) -> list[tuple[str, str]]:
    """Lowest free host addresses (from .2 up), like Docker's default IPAM."""
    import ipaddress
    if net is None:
        return [("", "")] * count
    v4, v6 = network_subnets(net)
    used: set[int] = set()
    for c in kstate["clusters"].values():
        if (c.get("network") or "kind") != net["Name"]:
            continue
        for n in c.get("nodes", []):
            if n.get("ipv4") and v4 is not None:
                with contextlib.suppress(ValueError):
                    used.add(int(ipaddress.ip_address(n["ipv4"])) - int(v4.network_address))
    gws = set()
    for c in (net.get("IPAM") or {}).get("Config") or []:
        if c.get("Gateway") and v4 is not None:
            with contextlib.suppress(ValueError):
                gw = ipaddress.ip_address(c["Gateway"])
                if gw.version == 4:
                    gws.add(int(gw) - int(v4.network_address))
    res: list[tuple[str, str]] = []
    idx = 2
    for _ in range(count):
        while idx in used or idx in gws:
            idx += 1
        used.add(idx)
        a4 = str(v4.network_address + idx) if v4 is not None else ""
        a6 = str(v6.network_address + idx) if v6 is not None else ""
        res.append((a4, a6))
    return res


def server_url_for(state: State, name: str, config: dict[str, Any] | None) -> str:
    servers = state.read("apiservers.json", {}) or {}
    if servers.get(name):
        return str(servers[name])
    if os.environ.get("LAB_FAKE_KUBE_URL"):
        return os.environ["LAB_FAKE_KUBE_URL"]
    net = (config or {}).get("networking") or {}
    if net.get("apiServerPort"):
        return f"https://{net.get('apiServerAddress') or '127.0.0.1'}:{net['apiServerPort']}"
    return DEFAULT_KUBE_URL


def api_port_mapping(server: str) -> dict[str, Any]:
    """kind publishes the API server on 127.0.0.1:<random> → 6443 (the LB's port when HA)."""
    import ipaddress
    import urllib.parse

    u = urllib.parse.urlsplit(server)
    host = u.hostname or "127.0.0.1"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        host = "127.0.0.1"
    return {"containerPort": 6443, "hostPort": u.port or 6443, "listenAddress": host,
            "protocol": "TCP"}


def published_ports(rec: dict[str, Any]) -> list[dict[str, Any]]:
    extra = [rec["api_mapping"]] if rec.get("api_mapping") else []
    return extra + list(rec.get("port_mappings") or [])


def ensure_custom_network(state: State, d: dict[str, Any], k: dict[str, Any], name: str) -> None:
    """kind creates KIND_EXPERIMENTAL_DOCKER_NETWORK when missing (Docker picks a free /16)."""
    import ipaddress
    nets = network_defs(state, d, k)
    if name in nets:
        return
    used = set()
    for n in nets.values():
        for c in (n.get("IPAM") or {}).get("Config") or []:
            with contextlib.suppress(ValueError, KeyError):
                used.add(ipaddress.ip_network(c["Subnet"], strict=False))
    for octet in range(19, 32):
        cand = ipaddress.ip_network(f"172.{octet}.0.0/16")
        if not any(cand.overlaps(u) for u in used):
            break
    d.setdefault("networks", {})[name] = {
        "EnableIPv6": True,
        "IPAM": {"Driver": "default", "Options": {}, "Config": [
            {"Subnet": str(cand), "Gateway": str(cand.network_address + 1)},
            {"Subnet": f"fc00:f853:ccd:{octet:04x}::/64",
             "Gateway": f"fc00:f853:ccd:{octet:04x}::1"}]},
        "Options": {"com.docker.network.bridge.enable_ip_masquerade": "true",
                    "com.docker.network.driver.mtu": "1500"}}


def container_records(state: State) -> list[dict[str, Any]]:
    """Docker's view of every container (kind nodes), newest cluster first."""
    k = kind_state(state)
    d = docker_state(state)
    states = d.get("containers_state") or {}
    recs: list[dict[str, Any]] = []
    clusters = sorted(k["clusters"].values(), key=lambda c: -int(c.get("seq", 0)))
    for c in clusters:
        for n in c.get("nodes", []):
            recs.append({**n, "cluster": c["name"], "cluster_rec": c,
                         "state": states.get(n["name"], "running")})
    return recs


def container_inspect_obj(state: State, rec: dict[str, Any], net: dict[str, Any] | None
                          ) -> dict[str, Any]:
    import ipaddress
    c = rec["cluster_rec"]
    name = rec["name"]
    running = rec["state"] == "running"
    ports: dict[str, Any] = {}
    bindings: dict[str, Any] = {}
    for pm in published_ports(rec):
        key = f"{pm['containerPort']}/{pm.get('protocol', 'TCP').lower()}"
        b = [{"HostIp": pm.get("listenAddress", "0.0.0.0"), "HostPort": str(pm["hostPort"])}]
        bindings[key] = b
        ports[key] = b if running else None
    v4, v6 = network_subnets(net) if net else (None, None)
    networks = {}
    if net is not None:
        gw4 = next((x.get("Gateway", "") for x in net["IPAM"]["Config"]
                    if x.get("Subnet") and ipaddress.ip_network(x["Subnet"], strict=False)
                    .version == 4), "")
        gw6 = next((x.get("Gateway", "") for x in net["IPAM"]["Config"]
                    if x.get("Subnet") and ipaddress.ip_network(x["Subnet"], strict=False)
                    .version == 6), "") if v6 else ""
        networks[net["Name"]] = {
            "IPAMConfig": None, "Links": None, "Aliases": None,
            "MacAddress": rec.get("mac", ""), "DriverOpts": None, "GwPriority": 0,
            "NetworkID": net["Id"], "EndpointID": hexid("ep", name) if running else "",
            "Gateway": gw4 if running else "",
            "IPAddress": rec.get("ipv4", "") if running else "",
            "IPPrefixLen": v4.prefixlen if (v4 and running) else 0,
            "IPv6Gateway": gw6 if running else "",
            "GlobalIPv6Address": rec.get("ipv6", "") if running else "",
            "GlobalIPv6PrefixLen": v6.prefixlen if (v6 and running) else 0,
            "DNSNames": [name, rec["id"][:12]],
        }
    labels = {KIND_CLUSTER_LABEL: rec["cluster"], KIND_ROLE_LABEL: rec["role"]}
    return {
        "Id": rec["id"],
        "Created": c.get("created_iso", "2025-01-01T00:00:00.000000000Z"),
        "Path": "/usr/local/bin/entrypoint",
        "Args": ["/sbin/init"],
        "State": {"Status": rec["state"], "Running": running, "Paused": False,
                  "Restarting": False, "OOMKilled": False, "Dead": False,
                  "Pid": 4242 if running else 0, "ExitCode": 0 if running else 137,
                  "Error": "", "StartedAt": c.get("created_iso", ""),
                  "FinishedAt": "0001-01-01T00:00:00Z"},
        "Image": "sha256:" + hexid("image", rec["image"]),
        "Name": "/" + name,
        "RestartCount": 0,
        "Driver": "overlay2",
        "Platform": "linux",
        "HostConfig": {"Privileged": True, "RestartPolicy": {"Name": "on-failure",
                                                             "MaximumRetryCount": 1},
                       "PortBindings": bindings, "NetworkMode": net["Name"] if net else ""},
        "Config": {"Hostname": name, "Image": rec["image"], "Labels": labels,
                   "Env": ["container=docker", "KIND_EXPERIMENTAL_CONTAINERD_SNAPSHOTTER"],
                   "Entrypoint": ["/usr/local/bin/entrypoint", "/sbin/init"]},
        "NetworkSettings": {"SandboxID": hexid("sandbox", name) if running else "",
                            "Ports": ports, "Networks": networks},
    }


# ================================================================================================
# kind
# ================================================================================================

KIND_GLOBAL = [F("verbosity/v", "int"), F("quiet/q", "bool")]
KIND_CMDS: dict[tuple[str, ...], list[Flag]] = {
    ("version",): [],
    ("create", "cluster"): [F("name/n"), F("config"), F("image"), F("retain", "bool"),
                            F("wait", "dur", default="0s"), F("kubeconfig")],
    ("delete", "cluster"): [F("name/n"), F("kubeconfig")],
    ("delete", "clusters"): [F("kubeconfig"), F("all/A", "bool")],
    ("get", "clusters"): [],
    ("get", "nodes"): [F("name/n"), F("all-clusters/A", "bool")],
    ("get", "kubeconfig"): [F("name/n"), F("internal", "bool")],
    ("export", "kubeconfig"): [F("name/n"), F("kubeconfig"), F("internal", "bool")],
}
KIND_TREE: dict[str, Any] = {
    "version": None, "create": {"cluster": None},
    "delete": {"cluster": None, "clusters": None},
    "get": {"clusters": None, "nodes": None, "kubeconfig": None},
    "export": {"kubeconfig": None, "logs": None},
    "load": {"docker-image": None, "image-archive": None},
    "build": {"node-image": None}, "completion": {"bash": None, "zsh": None, "fish": None},
}

KIND_KNOWN_FIELDS: dict[str, Any] = {
    "kind": str, "apiVersion": str, "name": str,
    "nodes": [{
        "role": str, "image": str, "labels": dict,
        "extraMounts": [{"containerPath": str, "hostPath": str, "readOnly": bool,
                         "selinuxRelabel": bool, "propagation": str}],
        "extraPortMappings": [{"containerPort": int, "hostPort": int, "listenAddress": str,
                               "protocol": str}],
        "kubeadmConfigPatches": list,
        "kubeadmConfigPatchesJSON6902": [{"group": str, "version": str, "kind": str,
                                          "patch": str}],
    }],
    "networking": {"ipFamily": str, "apiServerPort": int, "apiServerAddress": str,
                   "podSubnet": str, "serviceSubnet": str, "disableDefaultCNI": bool,
                   "kubeProxyMode": str, "dnsSearch": list},
    "featureGates": dict, "runtimeConfig": dict, "kubeadmConfigPatches": list,
    "kubeadmConfigPatchesJSON6902": [{"group": str, "version": str, "kind": str,
                                      "patch": str}],
    "containerdConfigPatches": list, "containerdConfigPatchesJSON6902": list,
}
KIND_TYPE_NAMES = {"": "v1alpha4.Cluster", "nodes": "v1alpha4.Node",
                   "networking": "v1alpha4.Networking", "extraMounts": "v1alpha4.Mount",
                   "extraPortMappings": "v1alpha4.PortMapping",
                   "kubeadmConfigPatchesJSON6902": "v1alpha4.PatchJSON6902"}


def kind_error(msg: str, command_output: str | None = None) -> Exit:
    text = f"ERROR: {msg}"
    if command_output is not None:
        text += f"\n\nCommand Output: {command_output}"
    return Exit(1, text)


def kind_docker_down_error(prefix: str, docker_args: list[str]) -> Exit:
    cmd = " ".join(shell_quote(a) for a in ["docker", *docker_args])
    return kind_error(f'{prefix}command "{cmd}" failed with error: exit status 1', DOCKER_DOWN_MSG)


def _strict_check(node: Any, schema: Any, path: str, problems: list[str]) -> None:
    yaml = yaml_mod()
    if isinstance(schema, dict) and isinstance(node, yaml.MappingNode):
        tname = KIND_TYPE_NAMES.get(path.split(".")[-1] if path else "", "v1alpha4." + path)
        for k, v in node.value:
            key = k.value
            if key not in schema:
                problems.append(f"  line {k.start_mark.line + 1}: field {key} not found in type "
                                f"{tname}")
            else:
                _strict_check(v, schema[key], key, problems)
    elif isinstance(schema, list) and schema and isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _strict_check(item, schema[0], path, problems)


def kind_load_config(text: str) -> dict[str, Any]:
    yaml = yaml_mod()
    try:
        data = yaml_load(text) if text.strip() else {}
    except yaml.YAMLError as e:
        raise kind_error(f"failed to create cluster: could not determine kind / apiVersion for "
                         f"config: {e}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise kind_error("failed to create cluster: could not determine kind / apiVersion for "
                         "config: error unmarshaling JSON")
    if not text.strip():
        return {}
    av = data.get("apiVersion", "")
    if av != "kind.x-k8s.io/v1alpha4":
        raise kind_error(f"failed to create cluster: unknown apiVersion: {av}")
    if data.get("kind") != "Cluster":
        raise kind_error(f"failed to create cluster: unknown kind {data.get('kind', '')} for "
                         f"apiVersion: {av}")
    problems: list[str] = []
    _strict_check(yaml.compose(text), KIND_KNOWN_FIELDS, "", problems)
    if problems:
        raise kind_error("failed to create cluster: unable to decode config: yaml: unmarshal "
                         "errors:\n" + "\n".join(problems))
    return data


def kind_validate(name: str, cfg: dict[str, Any]) -> None:
    import ipaddress
    errs: list[str] = []
    if not re.fullmatch(r"[a-z0-9.-]+", name):
        errs.append(f"'{name}' is not a valid cluster name, cluster names must match "
                    "`^[a-z0-9.-]+$`")
    net = cfg.get("networking") or {}
    fam = net.get("ipFamily", "ipv4")
    if fam not in ("ipv4", "ipv6", "dual"):
        errs.append(f"invalid ipFamily: {fam}")
    mode = net.get("kubeProxyMode", "iptables")
    if mode not in ("iptables", "ipvs", "nftables", "none"):
        errs.append(f"invalid kubeProxyMode: {mode}")
    for key in ("podSubnet", "serviceSubnet"):
        if net.get(key):
            for sub in str(net[key]).split(","):
                try:
                    ipaddress.ip_network(sub.strip(), strict=False)
                except ValueError:
                    label = "pod" if key == "podSubnet" else "service"
                    errs.append(f"invalid {label} subnet invalid CIDR address: {sub.strip()}")
    nodes = cfg.get("nodes") or [{"role": "control-plane"}]
    cps = 0
    for i, n in enumerate(nodes):
        role = (n or {}).get("role", "control-plane")
        nerrs = []
        if role not in ("control-plane", "worker"):
            nerrs.append(f'"{role}" is not a valid node role')
        seen: set[tuple[str, int, str]] = set()
        for pm in (n or {}).get("extraPortMappings") or []:
            hp, cp = int(pm.get("hostPort", 0) or 0), int(pm.get("containerPort", 0) or 0)
            if not -1 <= hp <= 65535:
                nerrs.append(f"invalid hostPort: invalid port number: {hp}")
            if not 0 <= cp <= 65535:
                nerrs.append(f"invalid containerPort: invalid port number: {cp}")
            if hp > 0:
                k = (pm.get("listenAddress") or "0.0.0.0", hp, (pm.get("protocol") or "TCP"))
                if k in seen:
                    nerrs.append("invalid portMapping: port mapping with same listen address, "
                                 f"port and protocol already configured: {k[0]}:{k[1]}/{k[2]}")
                seen.add(k)
        if nerrs:
            joined = nerrs[0] if len(nerrs) == 1 else "[" + ", ".join(nerrs) + "]"
            errs.append(f"invalid configuration for node {i}: {joined}")
        if role == "control-plane":
            cps += 1
    if cps < 1:
        errs.append("must have at least one control-plane node")
    if errs:
        joined = errs[0] if len(errs) == 1 else "[" + ", ".join(errs) + "]"
        raise kind_error(f"failed to create cluster: {joined}")


def kind_plan_nodes(name: str, cfg: dict[str, Any], image_flag: str | None
                    ) -> list[dict[str, Any]]:
    nodes_cfg = cfg.get("nodes") or [{"role": "control-plane"}]
    cps = [n or {} for n in nodes_cfg if (n or {}).get("role", "control-plane") == "control-plane"]
    workers = [n or {} for n in nodes_cfg if (n or {}).get("role") == "worker"]
    plan: list[dict[str, Any]] = []

    def suffix(i: int) -> str:
        return "" if i == 0 else str(i + 1)

    for i, n in enumerate(cps):
        plan.append({"name": f"{name}-control-plane{suffix(i)}", "role": "control-plane",
                     "image": image_flag or n.get("image") or KIND_DEFAULT_IMAGE,
                     "port_mappings": list(n.get("extraPortMappings") or [])})
    for i, n in enumerate(workers):
        plan.append({"name": f"{name}-worker{suffix(i)}", "role": "worker",
                     "image": image_flag or n.get("image") or KIND_DEFAULT_IMAGE,
                     "port_mappings": list(n.get("extraPortMappings") or [])})
    if len(cps) > 1:
        plan.append({"name": f"{name}-external-load-balancer", "role": "external-load-balancer",
                     "image": "docker.io/kindest/haproxy:v20230606-42a2262b", "port_mappings": []})
    return plan


def _mapping_key(pm: dict[str, Any]) -> tuple[str, int, str]:
    return (pm.get("listenAddress") or "0.0.0.0", int(pm.get("hostPort") or 0),
            (pm.get("protocol") or "TCP").upper())


def _bind_conflict(a: tuple[str, int, str], b: tuple[str, int, str]) -> bool:
    if a[1] != b[1] or a[2] != b[2] or a[1] <= 0:
        return False
    wild = ("0.0.0.0", "::", "")
    return a[0] == b[0] or a[0] in wild or b[0] in wild


def kind_find_port_conflict(state: State, kstate: dict[str, Any], plan: list[dict[str, Any]],
                            server: str) -> tuple[dict[str, Any], str, bool] | None:
    taken: list[tuple[str, int, str]] = []
    for c in kstate["clusters"].values():
        for n in c.get("nodes", []):
            taken.extend(_mapping_key(pm) for pm in n.get("port_mappings", []))
    external: list[tuple[str, int, str]] = []
    for item in docker_state(state).get("host_ports_in_use") or []:
        s = str(item)
        proto = "TCP"
        if "/" in s:
            s, proto = s.rsplit("/", 1)
        addr, _, port = s.rpartition(":")
        external.append((addr or "0.0.0.0", int(port), proto.upper()))
    for node in plan:
        for pm in node["port_mappings"]:
            k = _mapping_key(pm)
            for t in taken:
                if _bind_conflict(k, t):
                    return node, f"{k[0]}:{k[1]}", False
            for t in external:
                if _bind_conflict(k, t):
                    return node, f"{k[0]}:{k[1]}", True
    return None


def kind_main(state: State, argv: list[str]) -> None:
    all_flags = KIND_GLOBAL + [f for fl in KIND_CMDS.values() for f in fl]
    path, rest = split_command(argv, KIND_TREE, value_flag_tokens(all_flags))
    if not path:
        if any(a in ("-h", "--help") for a in rest) or not rest:
            out("kind creates and manages local Kubernetes clusters using Docker container "
                "'nodes'\n\nUsage:\n  kind [command]")
            return
        if "--version" in rest:
            out(f"kind version {KIND_VERSION.lstrip('v')}")
            return
        try:
            parse_flags(rest, KIND_GLOBAL)
        except UsageError as e:
            raise kind_error(str(e)) from None
        return
    if path[0] not in KIND_TREE:
        raise kind_error(f'unknown command "{path[0]}" for "kind"')
    if isinstance(KIND_TREE[path[0]], dict) and len(path) == 1:
        raise kind_error("Subcommand is required")
    key = tuple(path)
    if key not in KIND_CMDS:
        raise kind_error(f'fake kind does not implement "kind {" ".join(path)}"')
    try:
        opts, pos, _ = parse_flags(rest, [*KIND_GLOBAL, *KIND_CMDS[key]])
    except UsageError as e:
        raise kind_error(str(e)) from None
    if pos and key != ("delete", "clusters"):
        raise kind_error(f'unknown command "{pos[0]}" for "kind {" ".join(path)}"')
    keys = injection_keys("kind", path)
    fail = injected_failure(state, keys)
    if key == ("create", "cluster"):
        kind_create(state, opts, fail, injected_sleep(state, keys))
        return
    if fail is not None:
        raise fail_with(fail, KIND_FAIL_DEFAULTS.get(key[0], "ERROR: injected failure"))
    do_sleep(injected_sleep(state, keys))
    name = opts.get("name") or os.environ.get("KIND_CLUSTER_NAME") or "kind"
    if key == ("version",):
        out(f"kind {KIND_VERSION} {KIND_GO} linux/amd64")
    elif key == ("get", "clusters"):
        if docker_is_down(state):
            raise kind_docker_down_error("failed to list clusters: ", [
                "ps", "-a", "--filter", f"label={KIND_CLUSTER_LABEL}", "--format",
                '{{.Label "' + KIND_CLUSTER_LABEL + '"}}'])
        names = sorted(kind_state(state)["clusters"])
        if not names:
            err("No kind clusters found.")
        for n in names:
            out(n)
    elif key == ("get", "nodes"):
        kind_get_nodes(state, name, bool(opts.get("all-clusters")))
    elif key == ("get", "kubeconfig"):
        out(yaml_dump(kind_cluster_kubeconfig(state, name, bool(opts.get("internal")))))
    elif key == ("export", "kubeconfig"):
        cfg = kind_cluster_kubeconfig(state, name, bool(opts.get("internal")))
        with state.locked():
            try:
                merge_kind_kubeconfig(kubeconfig_merge_path(opts.get("kubeconfig")), name,
                                      cfg["clusters"][0]["cluster"]["server"])
            except KubeconfigLocked as e:
                raise kind_error(f"failed to export kubeconfig: {e}") from None
        err(f'Set kubectl context to "kind-{name}"')
    elif key == ("delete", "cluster"):
        err(f'Deleting cluster "{name}" ...')
        kind_delete(state, name, opts.get("kubeconfig"))
    elif key == ("delete", "clusters"):
        names = list(pos)
        if opts.get("all"):
            if docker_is_down(state):
                raise kind_docker_down_error("failed listing clusters for delete: failed to list "
                                             "clusters: ", [
                                                 "ps", "-a", "--filter",
                                                 f"label={KIND_CLUSTER_LABEL}", "--format",
                                                 '{{.Label "' + KIND_CLUSTER_LABEL + '"}}'])
            names = sorted(kind_state(state)["clusters"])
        elif not names:
            raise kind_error("no cluster names provided")
        done = []
        for n in names:
            try:
                kind_delete(state, n, opts.get("kubeconfig"))
                done.append(n)
            except Exit as e:
                err(e.stderr.replace("ERROR: ", "", 1) + "\n")
        err("Deleted clusters: [" + " ".join(json.dumps(n) for n in done) + "]")


KIND_FAIL_DEFAULTS = {
    "get": "ERROR: failed to list clusters: command \"docker ps -a --filter "
           "label=io.x-k8s.kind.cluster --format '{{.Label \"io.x-k8s.kind.cluster\"}}'\" "
           "failed with error: exit status 1",
    "delete": "ERROR: failed to delete cluster \"kind\": error listing nodes: failed to list "
              "nodes: exit status 1",
    "export": "ERROR: failed to get cluster internal kubeconfig: command \"docker exec "
              "--privileged kind-control-plane cat /etc/kubernetes/admin.conf\" failed with "
              "error: exit status 1",
}


def kind_list_nodes_or_fail(state: State, name: str, prefix: str = "") -> list[dict[str, Any]]:
    if docker_is_down(state):
        raise kind_docker_down_error(prefix + "failed to list nodes: ", [
            "ps", "-a", "--filter", f"label={KIND_CLUSTER_LABEL}={name}", "--format",
            "{{.Names}}"])
    c = kind_state(state)["clusters"].get(name)
    return list(c.get("nodes", [])) if c else []


def kind_get_nodes(state: State, name: str, all_clusters: bool) -> None:
    if all_clusters:
        k = kind_state(state)
        names = [n["name"] for c in sorted(k["clusters"]) for n in
                 k["clusters"][c].get("nodes", [])]
        if not names:
            err("No kind nodes for any cluster.")
        for n in names:
            out(n)
        return
    nodes = kind_list_nodes_or_fail(state, name)
    if not nodes:
        err(f'No kind nodes found for cluster "{name}".')
    for n in nodes:
        out(n["name"])


def kind_cluster_kubeconfig(state: State, name: str, internal: bool) -> dict[str, Any]:
    nodes = kind_list_nodes_or_fail(state, name)
    if not any(n["role"] == "control-plane" for n in nodes):
        raise kind_error(f"could not locate any control plane nodes for cluster named '{name}'. "
                         "Use the --name option to select a different cluster")
    c = kind_state(state)["clusters"][name]
    if internal:
        lb = next((n for n in nodes if n["role"] == "external-load-balancer"), None)
        server = f"https://{(lb or nodes[0])['name']}:6443"
    else:
        server = server_url_for(state, name, c.get("config"))
    return kind_kubeconfig(name, server)


def kind_delete(state: State, name: str, kubeconfig: str | None) -> None:
    nodes = kind_list_nodes_or_fail(state, name, prefix=f'failed to delete cluster "{name}": '
                                    "error listing nodes: ")
    kerr: KubeconfigLocked | None = None
    with state.locked():
        try:  # delete.go: a kubeconfig error is logged, the nodes go anyway, then it fails
            remove_kind_kubeconfig(kubeconfig_paths(kubeconfig), name)
        except KubeconfigLocked as e:
            err(f"ERROR: failed to update kubeconfig: {e}")
            kerr = e
        k = kind_state(state)
        if name in k["clusters"]:
            del k["clusters"][name]
            state.write("kind.json", k)
            d = docker_state(state)
            cs = d.get("containers_state") or {}
            if any(n["name"] in cs for n in nodes):
                for n in nodes:
                    cs.pop(n["name"], None)
                state.write("docker.json", d)
    if nodes:
        err("Deleted nodes: [" + " ".join(json.dumps(n["name"]) for n in nodes) + "]")
    if kerr is not None:
        raise kind_error(f'failed to delete cluster "{name}": {kerr}')


def kind_create(state: State, opts: dict[str, Any], fail: dict[str, Any] | None,
                sleep_s: float) -> None:
    cfg_path = opts.get("config")
    text = ""
    if cfg_path == "-":
        text = sys.stdin.read()
    elif cfg_path:
        try:
            with open(cfg_path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as e:
            raise kind_error(f"failed to create cluster: error reading file: open {cfg_path}: "
                             f"{e.strerror.lower() if e.strerror else e}") from None
    if docker_is_down(state):
        raise kind_docker_down_error("failed to create cluster: failed to get docker info: ",
                                     ["info", "--format", "{{json .}}"])
    info = docker_info_obj(state)
    if str(info.get("CgroupVersion", "2")) != "2":
        err("WARNING: cgroup v1 is deprecated in Kubernetes and will not be supported in a "
            "future kind release, please upgrade to cgroup v2")
    if os.environ.get("KIND_EXPERIMENTAL_DOCKER_NETWORK"):
        err("WARNING: Overriding docker network due to KIND_EXPERIMENTAL_DOCKER_NETWORK")
        err("WARNING: Here be dragons! This is not supported currently.")
    cfg = kind_load_config(text)
    name = opts.get("name") or os.environ.get("KIND_CLUSTER_NAME") or cfg.get("name") or "kind"
    plan = kind_plan_nodes(name, cfg, opts.get("image"))
    with state.locked():
        k = kind_state(state)
        if name in k["clusters"]:
            raise kind_error("failed to create cluster: node(s) already exist for a cluster with "
                             f'the name "{name}"')
    if len(name) > 50:
        err(f'WARNING: cluster name "{name}" is probably too long, this might not work properly '
            "on some systems")
    kind_validate(name, cfg)
    err(f'Creating cluster "{name}" ...')
    images = []
    for n in plan:
        if n["role"] != "external-load-balancer" and n["image"] not in images:
            images.append(n["image"])
    for img in images:
        err(f" ✓ Ensuring node image ({img.split('@', 1)[0]}) 🖼")
    server = server_url_for(state, name, cfg)
    real_nodes = [n for n in plan if n["role"] != "external-load-balancer"]
    boxes = "📦 " * len(real_nodes)
    with state.locked():
        k = kind_state(state)
        if name in k["clusters"]:
            raise kind_error("failed to create cluster: node(s) already exist for a cluster with "
                             f'the name "{name}"')
        conflict = kind_find_port_conflict(state, k, plan, server)
        if conflict is not None:
            node, bind, external = conflict
            err(f" ✗ Preparing nodes {boxes}")
            reason = (f"failed to bind host port for {bind}: address already in use" if external
                      else f"Bind for {bind} failed: port is already allocated")
            raise kind_error(
                f'failed to create cluster: command "docker run --name {node["name"]} '
                f'--hostname {node["name"]} --label {KIND_ROLE_LABEL}={node["role"]} --privileged '
                f"--detach --tty --label {KIND_CLUSTER_LABEL}={name} --net kind "
                f'{node["image"]}" failed with error: exit status 125',
                "docker: Error response from daemon: failed to set up container networking: "
                f"driver failed programming external connectivity on endpoint {node['name']} "
                f"({hexid('ep', node['name'])}): {reason}\n\nRun 'docker run --help' for more "
                "information")
        d = docker_state(state)
        net_name = os.environ.get("KIND_EXPERIMENTAL_DOCKER_NETWORK") or "kind"
        if net_name == "kind":
            d["kind_network_exists"] = True
        else:
            ensure_custom_network(state, d, k, net_name)
        state.write("docker.json", d)
        net = network_defs(state, d, k).get(net_name)
        ips = allocate_ips(k, net, len(plan))
        k["seq"] = int(k.get("seq", 0)) + 1
        now = time.time()
        api_node = next((n for n in plan if n["role"] == "external-load-balancer"), plan[0])
        api_node["api_mapping"] = api_port_mapping(server)
        for n, (a4, a6) in zip(plan, ips, strict=False):
            n["id"] = hexid("container", n["name"], str(now))
            n["ipv4"], n["ipv6"] = a4, a6
            n["mac"] = "02:42:" + ":".join(hexid("mac", n["name"])[i:i + 2] for i in range(0, 8, 2))
        k["clusters"][name] = {
            "name": name, "status": "creating", "seq": k["seq"], "created": now,
            "created_iso": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + ".000000000Z",
            "config_path": cfg_path, "config_text": text, "config": cfg,
            "image": opts.get("image") or (images[0] if images else KIND_DEFAULT_IMAGE),
            "retain": bool(opts.get("retain")), "wait": opts.get("wait") or "0s",
            "kubeconfig": opts.get("kubeconfig"), "server": server, "nodes": plan,
            "network": net["Name"] if net else None,
        }
        state.write("kind.json", k)
    err(f" ✓ Preparing nodes {boxes}")
    err(" ✓ Writing configuration 📜")
    do_sleep(sleep_s)
    if fail is not None:
        err(" ✗ Starting control-plane 🕹️")
        with state.locked():
            k = kind_state(state)
            if name in k["clusters"]:
                if opts.get("retain"):
                    k["clusters"][name]["status"] = "failed"
                else:
                    del k["clusters"][name]
                state.write("kind.json", k)
        if not opts.get("retain"):
            err("Deleted nodes: [" + " ".join(json.dumps(n["name"]) for n in plan) + "]")
        cp = plan[0]["name"]
        raise fail_with(fail, "ERROR: failed to create cluster: failed to init node with "
                              f'kubeadm: command "docker exec --privileged {cp} kubeadm init '
                              '--config=/kind/kubeadm.conf --skip-token-print --v=6" failed with '
                              "error: exit status 1")
    err(" ✓ Starting control-plane 🕹️")
    if not (cfg.get("networking") or {}).get("disableDefaultCNI"):
        err(" ✓ Installing CNI 🔌")
    err(" ✓ Installing StorageClass 💾")
    if sum(1 for n in plan if n["role"] == "control-plane") > 1:
        err(" ✓ Joining more control-plane nodes 🎮")
    if any(n["role"] == "worker" for n in plan):
        err(" ✓ Joining worker nodes 🚜")
    wait = parse_go_duration(opts.get("wait") or "0s")
    if wait > 0:
        err(f" ✓ Waiting ≤ {format_go_duration(wait)} for control-plane = Ready ⏳")
        err(" • Ready after 0s 💚")
    with state.locked():
        k = kind_state(state)
        if name not in k["clusters"]:  # deleted while we were "booting"
            raise kind_error(f'failed to create cluster: could not find node "{plan[0]["name"]}"')
        k["clusters"][name]["status"] = "running"
        k["clusters"][name]["server"] = server_url_for(state, name, cfg)
        state.write("kind.json", k)
        server = k["clusters"][name]["server"]
    # The nodes exist now; only the final export takes the kubeconfig lock, retried with
    # back-off 0/1/50/100 ms; on failure the cluster is kept (create.go).
    for backoff in (0, 0.001, 0.05, 0.1):
        time.sleep(backoff)
        try:
            with state.locked():
                merge_kind_kubeconfig(kubeconfig_merge_path(opts.get("kubeconfig")), name,
                                      server)
            break
        except KubeconfigLocked as e:
            locked = e
    else:
        raise kind_error(f"failed to create cluster: {locked}")
    err(f'Set kubectl context to "kind-{name}"')
    sample = f"kubectl cluster-info --context kind-{name}"
    if opts.get("kubeconfig"):
        sample += " --kubeconfig " + shell_quote(opts["kubeconfig"])
    err(f"You can now use your cluster with:\n\n{sample}")
    err("")
    err("Thanks for using kind! 😊")


# ================================================================================================
# docker
# ================================================================================================

DOCKER_GLOBAL = [F("config"), F("context/c"), F("debug/D", "bool"), F("host/H", "array"),
                 F("log-level/l"), F("tls", "bool"), F("tlsverify", "bool"), F("tlscacert"),
                 F("tlscert"), F("tlskey"), F("version/v", "bool"), F("help", "bool")]


def docker_info_obj(state: State) -> dict[str, Any]:
    d = docker_state(state)
    running = sum(1 for r in container_records(state) if r["state"] == "running")
    total = len(container_records(state))
    info: dict[str, Any] = {
        "ID": "f3c2b6d4-0b1e-4f5e-9a57-1a2b3c4d5e6f", "Containers": total,
        "ContainersRunning": running, "ContainersPaused": 0, "ContainersStopped": total - running,
        "Images": 3, "Driver": "overlay2",
        "DriverStatus": [["Backing Filesystem", "extfs"], ["Supports d_type", "true"]],
        "MemoryLimit": True, "SwapLimit": True, "CpuCfsPeriod": True, "CpuCfsQuota": True,
        "CPUShares": True, "CPUSet": True, "PidsLimit": True, "IPv4Forwarding": True,
        "Debug": False, "NFd": 30, "OomKillDisable": False, "NGoroutines": 50,
        "SystemTime": time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime()),
        "LoggingDriver": "json-file", "CgroupDriver": "systemd", "CgroupVersion": "2",
        "NEventsListener": 0, "KernelVersion": "6.8.0-60-generic",
        "OperatingSystem": "Ubuntu 24.04 LTS", "OSVersion": "24.04", "OSType": "linux",
        "Architecture": "x86_64", "IndexServerAddress": "https://index.docker.io/v1/",
        "NCPU": 8, "MemTotal": 16_663_040_000, "DockerRootDir": "/var/lib/docker",
        "Name": "lab-host", "Labels": [], "ExperimentalBuild": False,
        "ServerVersion": DOCKER_VERSION, "DefaultRuntime": "runc",
        "Runtimes": {"runc": {"path": "runc"}}, "LiveRestoreEnabled": False,
        "Isolation": "", "InitBinary": "docker-init",
        "SecurityOptions": ["name=apparmor", "name=seccomp,profile=builtin", "name=cgroupns"],
        "Warnings": None, "ClientInfo": {"Debug": False, "Version": DOCKER_VERSION,
                                         "Context": "default", "Plugins": []},
    }
    return deep_merge(info, d.get("info") or {})


def docker_version_obj(state: State, server: bool) -> dict[str, Any]:
    d = docker_state(state)
    client = {"Platform": {"Name": "Docker Engine - Community"}, "Version": DOCKER_VERSION,
              "ApiVersion": DOCKER_API, "DefaultAPIVersion": DOCKER_API, "GitCommit": "ecc6942",
              "GoVersion": DOCKER_GO, "Os": "linux", "Arch": "amd64",
              "BuildTime": "Wed Nov  5 14:43:25 2025", "Context": "default"}
    client = deep_merge(client, d.get("client_version") or {})
    if not server:
        return {"Client": client, "Server": None}
    info = docker_info_obj(state)
    srv = {
        "Platform": {"Name": "Docker Engine - Community"},
        "Components": [
            {"Name": "Engine", "Version": info["ServerVersion"],
             "Details": {"ApiVersion": DOCKER_API, "Arch": "amd64",
                         "BuildTime": "Wed Nov  5 14:43:25 2025", "Experimental": "false",
                         "GitCommit": "89c5e8f", "GoVersion": DOCKER_GO,
                         "KernelVersion": info["KernelVersion"], "MinAPIVersion": "1.24",
                         "Os": "linux"}},
            {"Name": "containerd", "Version": "v1.7.28",
             "Details": {"GitCommit": "b98a3aace656320842a23f4a392a33f46af97866"}},
            {"Name": "runc", "Version": "1.3.0", "Details": {"GitCommit": "v1.3.0-0-g4ca628d1"}},
            {"Name": "docker-init", "Version": "0.19.0", "Details": {"GitCommit": "de40ad0"}},
        ],
        "Version": info["ServerVersion"], "ApiVersion": DOCKER_API, "MinAPIVersion": "1.24",
        "GitCommit": "89c5e8f", "GoVersion": DOCKER_GO, "Os": "linux", "Arch": "amd64",
        "KernelVersion": info["KernelVersion"], "BuildTime": "2025-11-05T14:43:25.000000000+00:00",
    }
    srv = deep_merge(srv, d.get("version") or {})
    return {"Client": client, "Server": srv}


def docker_usage_error(cmd: str, msg: str) -> Exit:
    return Exit(125, f"{msg}\nSee 'docker {cmd} --help'.")


def docker_require_up(state: State) -> None:
    if docker_is_down(state):
        raise Exit(1, DOCKER_DOWN_MSG)


def docker_apply_format(fmt: str | None, items: list[Any], default: Callable[[], None]) -> None:
    if not fmt:
        default()
        return
    if fmt == "json":
        fmt = "{{json .}}"
    table = fmt.startswith("table")
    if table:
        fmt = fmt[len("table"):].strip()
        hdr = re.sub(r"\{\{\s*(?:json\s+)?\.(\w+)[^}]*\}\}",
                     lambda m: re.sub(r"(?<!^)(?=[A-Z][a-z])", " ", m.group(1)).upper(), fmt)
        out(hdr.replace("\\t", "\t"))
    fmt = fmt.replace("\\t", "\t").replace("\\n", "\n")
    for it in items:
        try:
            out(render_go_template(fmt, it))
        except TemplateError as e:
            raise Exit(64, f"template parsing error: {e}") from None


def docker_main(state: State, argv: list[str]) -> None:
    try:
        gopts, rest, _ = parse_flags(argv, DOCKER_GLOBAL, interspersed=False)
    except UsageError as e:
        raise docker_usage_error("", str(e)) from None
    if gopts.get("version"):
        out(f"Docker version {DOCKER_VERSION}, build ecc6942")
        return
    if not rest:
        out("Usage:  docker [OPTIONS] COMMAND\n\nA self-sufficient runtime for containers")
        return
    cmd, args = rest[0], rest[1:]
    sub = None
    if cmd in ("network", "container", "system", "volume") and args and \
            not args[0].startswith("-"):
        sub, args = args[0], args[1:]
    path = [cmd] + ([sub] if sub else [])
    keys = injection_keys("docker", path)
    fail = injected_failure(state, keys)
    if fail is not None:
        raise fail_with(fail, DOCKER_FAIL_DEFAULTS.get(cmd, "Error response from daemon: "
                                                       "injected failure"))
    do_sleep(injected_sleep(state, keys))
    if cmd == "container":
        cmd = {"ls": "ps", "list": "ps", "inspect": "container-inspect", "exec": "exec",
               "start": "start", "stop": "stop", "run": "run", "rm": "rm"
               }.get(sub or "", "container-" + (sub or ""))
    if cmd in ("run", "rm", "volume") or (cmd == "network" and sub in ("connect", "disconnect")):
        docker_standalone(state, cmd, sub, args)  # the image cache's registry containers
    elif cmd == "version":
        docker_version(state, args)
    elif cmd == "info":
        docker_info(state, args)
    elif cmd == "network":
        docker_network(state, sub, args)
    elif cmd == "ps":
        docker_ps(state, args)
    elif cmd in ("inspect", "container-inspect"):
        docker_inspect(state, args, containers_only=cmd == "container-inspect")
    elif cmd == "exec":
        docker_exec(state, args)
    elif cmd in ("start", "stop", "restart", "kill"):
        docker_start_stop(state, cmd, args)
    else:
        raise Exit(1, f"docker: unknown command: docker {' '.join(path)}\n\n"
                      "Run 'docker --help' for more information")


DOCKER_FAIL_DEFAULTS = {
    "network": "Error response from daemon: failed to create network: Error response from "
               "daemon: injected failure",
    "exec": "OCI runtime exec failed: exec failed: unable to start container process: "
            "injected failure",
    "info": DOCKER_DOWN_MSG, "version": DOCKER_DOWN_MSG, "ps": DOCKER_DOWN_MSG,
}


def docker_version(state: State, args: list[str]) -> None:
    try:
        opts, pos, _ = parse_flags(args, [F("format/f")])
    except UsageError as e:
        raise docker_usage_error("version", str(e)) from None
    if pos:
        raise docker_usage_error("version", '"docker version" accepts no arguments.')
    down = docker_is_down(state)
    data = docker_version_obj(state, server=not down)
    fmt = opts.get("format")
    if fmt:
        if fmt == "json":
            fmt = "{{json .}}"
        try:
            out(render_go_template(fmt, data))
        except TemplateError as e:
            if not down:
                raise Exit(1, f"template: version:1: executing \"version\": {e}") from None
            out("")  # .Server is nil: the template stops, docker still prints the newline
    else:
        c = data["Client"]
        lines = [f"Client: {c['Platform']['Name']}", f" Version:           {c['Version']}",
                 f" API version:       {c['ApiVersion']}", f" Go version:        {c['GoVersion']}",
                 f" Git commit:        {c['GitCommit']}", f" Built:             {c['BuildTime']}",
                 f" OS/Arch:           {c['Os']}/{c['Arch']}",
                 f" Context:           {c['Context']}"]
        if not down:
            s = data["Server"]
            lines += ["", f"Server: {s['Platform']['Name']}"]
            for comp in s["Components"]:
                lines.append(f" {comp['Name']}:")
                det = comp.get("Details") or {}
                if comp["Name"] == "Engine":
                    lines += [f"  Version:          {comp['Version']}",
                              f"  API version:      {det.get('ApiVersion')} (minimum version "
                              f"{det.get('MinAPIVersion')})",
                              f"  Go version:       {det.get('GoVersion')}",
                              f"  Git commit:       {det.get('GitCommit')}",
                              f"  Built:            {det.get('BuildTime')}",
                              f"  OS/Arch:          {det.get('Os')}/{det.get('Arch')}",
                              f"  Experimental:     {det.get('Experimental')}"]
                else:
                    lines.append(f"  Version:          {comp['Version']}")
                    for k in sorted(det):
                        lines.append(f"  {k}:{' ' * max(1, 16 - len(k))}{det[k]}")
        out("\n".join(lines))
    if down:
        raise Exit(1, DOCKER_DOWN_MSG)


def docker_info(state: State, args: list[str]) -> None:
    try:
        opts, _, _ = parse_flags(args, [F("format/f")])
    except UsageError as e:
        raise docker_usage_error("info", str(e)) from None
    fmt = opts.get("format")
    down = docker_is_down(state)
    if down:
        if fmt:
            empty = {"ID": "", "Containers": 0, "ServerVersion": "", "OperatingSystem": "",
                     "ServerErrors": [DOCKER_DOWN_MSG],
                     "ClientInfo": {"Debug": False, "Version": DOCKER_VERSION,
                                    "Context": "default", "Plugins": []}}
            with contextlib.suppress(TemplateError):
                out(render_go_template("{{json .}}" if fmt == "json" else fmt, empty))
            raise Exit(1, DOCKER_DOWN_MSG)
        out(f"Client: Docker Engine - Community\n Version:    {DOCKER_VERSION}\n Context:    "
            "default\n Debug Mode: false\n\nServer:")
        raise Exit(1, f"ERROR: {DOCKER_DOWN_MSG}\nerrors pretty printing info")
    info = docker_info_obj(state)
    if fmt:
        try:
            out(render_go_template("{{json .}}" if fmt == "json" else fmt, info))
        except TemplateError as e:
            raise Exit(64, f"template parsing error: {e}") from None
        return
    out("\n".join([
        "Client: Docker Engine - Community", f" Version:    {DOCKER_VERSION}",
        " Context:    default", " Debug Mode: false", "", "Server:",
        f" Containers: {info['Containers']}", f"  Running: {info['ContainersRunning']}",
        "  Paused: 0", f"  Stopped: {info['ContainersStopped']}", f" Images: {info['Images']}",
        f" Server Version: {info['ServerVersion']}", f" Storage Driver: {info['Driver']}",
        f" Cgroup Driver: {info['CgroupDriver']}", f" Cgroup Version: {info['CgroupVersion']}",
        f" Kernel Version: {info['KernelVersion']}",
        f" Operating System: {info['OperatingSystem']}", f" OSType: {info['OSType']}",
        f" Architecture: {info['Architecture']}", f" CPUs: {info['NCPU']}",
        f" Total Memory: {info['MemTotal'] / 2**30:.2f}GiB", f" Name: {info['Name']}",
        f" Docker Root Dir: {info['DockerRootDir']}"]))


def networks_with_containers(state: State) -> dict[str, dict[str, Any]]:
    nets = network_defs(state)
    for rec in container_records(state):
        if rec["state"] != "running":
            continue
        net = nets.get(rec["cluster_rec"].get("network") or "kind")
        if net is None:
            continue
        v4, v6 = network_subnets(net)
        net.setdefault("Containers", {})[rec["id"]] = {
            "Name": rec["name"], "EndpointID": hexid("ep", rec["name"]),
            "MacAddress": rec.get("mac", ""),
            "IPv4Address": f"{rec['ipv4']}/{v4.prefixlen}" if rec.get("ipv4") and v4 else "",
            "IPv6Address": f"{rec['ipv6']}/{v6.prefixlen}" if rec.get("ipv6") and v6 else "",
        }
    return nets


def _wrap_ipam(net: dict[str, Any]) -> dict[str, Any]:
    """Make IPAM.Config entries print like Go structs with %v."""
    net = copy.deepcopy(net)
    net["IPAM"]["Config"] = [GoStruct(c, (("Subnet", ""), ("IPRange", ""), ("Gateway", ""),
                                          ("AuxAddress", {})))
                             for c in net["IPAM"].get("Config") or []]
    net["ID"] = net["Id"]
    return net


def docker_network(state: State, sub: str | None, args: list[str]) -> None:
    if sub is None:
        out("Usage:  docker network COMMAND\n\nManage networks")
        return
    if sub == "inspect":
        try:
            opts, names, _ = parse_flags(args, [F("format/f"), F("verbose/v", "bool")])
        except UsageError as e:
            raise docker_usage_error("network inspect", str(e)) from None
        if not names:
            raise docker_usage_error("network inspect",
                                     '"docker network inspect" requires at least 1 argument.')
        docker_require_up(state)
        nets = networks_with_containers(state)
        by_id = {n["Id"]: n for n in nets.values()}
        found, errors = [], []
        for name in names:
            n = nets.get(name) or by_id.get(name) or next(
                (v for k, v in by_id.items() if len(name) >= 3 and k.startswith(name)), None)
            if n is None:
                errors.append(f"Error response from daemon: network {name} not found")
            else:
                found.append(n)
        docker_emit_inspect(opts.get("format"), found, errors, transform=_wrap_ipam)
    elif sub in ("ls", "list"):
        try:
            opts, _, _ = parse_flags(args, [F("format"), F("filter/f", "array"),
                                            F("quiet/q", "bool"), F("no-trunc", "bool")])
        except UsageError as e:
            raise docker_usage_error("network ls", str(e)) from None
        docker_require_up(state)
        nets = sorted(network_defs(state).values(), key=lambda n: n["Name"])
        for flt in opts["filter"]:
            k, _, v = flt.partition("=")
            if k == "name":
                nets = [n for n in nets if v in n["Name"]]
            elif k == "driver":
                nets = [n for n in nets if n["Driver"] == v]
            elif k == "id":
                nets = [n for n in nets if n["Id"].startswith(v)]
            else:
                raise Exit(1, f"Error response from daemon: invalid filter '{k}'")
        rows = [{"ID": n["Id"][:12] if not opts["no-trunc"] else n["Id"], "Name": n["Name"],
                 "Driver": n["Driver"], "Scope": n["Scope"],
                 "IPv6": "true" if n.get("EnableIPv6") else "false",
                 "Internal": "false", "Labels": "", "CreatedAt": "2025-01-01 00:00:00 +0000 UTC"}
                for n in nets]
        if opts["quiet"]:
            for r in rows:
                out(r["ID"])
            return

        def table() -> None:
            out(f"{'NETWORK ID':<15}{'NAME':<10}{'DRIVER':<10}SCOPE")
            for r in rows:
                out(f"{r['ID']:<15}{r['Name']:<10}{r['Driver']:<10}{r['Scope']}")
        docker_apply_format(opts.get("format"), rows, table)
    elif sub in ("create", "rm", "remove", "connect", "disconnect", "prune"):
        docker_require_up(state)
        raise Exit(1, f"fake docker: `docker network {sub}` is not implemented; set networks in "
                      "$LAB_FAKE_STATE/docker.json instead")
    else:
        raise Exit(1, f"docker: unknown command: docker network {sub}\n\n"
                      "Run 'docker network --help' for more information")


def docker_emit_inspect(fmt: str | None, objs: list[dict[str, Any]], errors: list[str],
                        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None
                        ) -> None:
    if fmt and fmt != "json":
        for o in objs:
            try:
                out(render_go_template(fmt, transform(o) if transform else o))
            except TemplateError as e:
                raise Exit(64, f"template parsing error: {e}") from None
    elif fmt == "json":
        for o in objs:
            out(_to_json(o))
    else:
        out(json.dumps(objs, indent=4) if objs else "[]")
    if errors:
        raise Exit(1, "\n".join(errors))


def _ps_row(rec: dict[str, Any], no_trunc: bool) -> dict[str, Any]:
    labels = {KIND_CLUSTER_LABEL: rec["cluster"], KIND_ROLE_LABEL: rec["role"]}
    ports = ", ".join(f"{pm.get('listenAddress', '0.0.0.0')}:{pm['hostPort']}->"
                      f"{pm['containerPort']}/{pm.get('protocol', 'TCP').lower()}"
                      for pm in published_ports(rec) if rec["state"] == "running")
    age = max(0, int(time.time() - float(rec["cluster_rec"].get("created", time.time()))))
    running = rec["state"] == "running"
    return {
        "ID": rec["id"] if no_trunc else rec["id"][:12], "Image": rec["image"],
        "Command": '"/usr/local/bin/entr…"', "CreatedAt": rec["cluster_rec"].get("created_iso"),
        "RunningFor": f"{age} seconds ago", "Ports": ports, "State": rec["state"],
        "Status": f"Up {age} seconds" if running else "Exited (137) 1 second ago",
        "Size": "0B", "Names": rec["name"], "Networks": rec["cluster_rec"].get("network") or "",
        "Mounts": "", "LocalVolumes": "0",
        "Labels": ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
        "Label": lambda key: labels.get(key, ""),
    }


def _standalone_ps_rows(state: State, opts: dict[str, Any]) -> list[dict[str, Any]]:
    """`docker run` containers in `docker ps` (filters: name regex, status, label)."""
    rows = []
    for name, c in sorted((docker_state(state).get("standalone") or {}).items()):
        if not (opts["all"] or c["running"]):
            continue
        keep = True
        for flt in opts["filter"]:
            k, _, v = flt.partition("=")
            lk, eq, lv = v.partition("=")
            keep = keep and (
                (k == "name" and re.search(v, name) is not None)
                or (k == "status" and ("running" if c["running"] else "exited") == v)
                or (k == "label" and lk in c["labels"] and (not eq or c["labels"][lk] == lv)))
        if not keep:
            continue
        labels = c["labels"]
        rows.append({
            "ID": c["id"][:12], "Image": c["image"], "Names": name,
            "State": "running" if c["running"] else "exited",
            "Status": "Up 1 minute" if c["running"] else "Exited (0) 1 second ago",
            "Ports": ", ".join(f"127.0.0.1:{hp}->{cp}/tcp" for cp, hp in c["ports"].items())
            if c["running"] else "",
            "Labels": ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
            "Label": lambda key, labels=labels: labels.get(key, ""),
            "Command": '"/entrypoint.sh /e…"', "RunningFor": "1 minute ago", "Size": "0B",
            "CreatedAt": "2025-01-01 00:00:00 +0000 UTC", "Networks": ",".join(c["networks"]),
            "Mounts": "", "LocalVolumes": "1"})
    return rows


def docker_ps(state: State, args: list[str]) -> None:
    try:
        opts, pos, _ = parse_flags(args, [F("all/a", "bool"), F("filter/f", "array"),
                                          F("format"), F("quiet/q", "bool"),
                                          F("no-trunc", "bool"), F("last/n", "int"),
                                          F("latest/l", "bool"), F("size/s", "bool")])
    except UsageError as e:
        raise docker_usage_error("ps", str(e)) from None
    if pos:
        raise docker_usage_error("ps", '"docker ps" accepts no arguments.')
    docker_require_up(state)
    recs = container_records(state)
    if not opts["all"]:
        recs = [r for r in recs if r["state"] == "running"]
    names_f: list[str] = []
    for flt in opts["filter"]:
        k, _, v = flt.partition("=")
        if k == "label":
            lk, eq, lv = v.partition("=")
            recs = [r for r in recs if lk in (KIND_CLUSTER_LABEL, KIND_ROLE_LABEL) and
                    (not eq or {KIND_CLUSTER_LABEL: r["cluster"],
                                KIND_ROLE_LABEL: r["role"]}[lk] == lv)]
        elif k == "name":
            names_f.append(v)
        elif k == "status":
            recs = [r for r in recs if r["state"] == v]
        elif k == "id":
            recs = [r for r in recs if r["id"].startswith(v)]
        elif k == "network":
            recs = [r for r in recs if (r["cluster_rec"].get("network") or "") == v]
        else:
            raise Exit(1, f"Error response from daemon: invalid filter '{k}'")
    if names_f:
        recs = [r for r in recs if any(re.search(p, r["name"]) for p in names_f)]
    rows = [_ps_row(r, opts["no-trunc"]) for r in recs]
    rows += _standalone_ps_rows(state, opts)
    if opts["quiet"]:
        for r in rows:
            out(r["ID"])
        return

    def table() -> None:
        out("CONTAINER ID   IMAGE                  COMMAND                  CREATED          "
            "STATUS          PORTS                       NAMES")
        for r in rows:
            out(f"{r['ID']:<15}{r['Image'].split('@')[0]:<23}{r['Command']:<25}"
                f"{r['RunningFor']:<17}{r['Status']:<16}{r['Ports']:<28}{r['Names']}")
    docker_apply_format(opts.get("format"), rows, table)


# -- standalone containers (`docker run`), e.g. the lab's image cache ------------------------------
# docker.json: "standalone" {name: {id, image, labels, env, volumes, ports, networks, running}},
# "volumes" {name: {labels}}; "cachePorts" {name: host port} fixes a published port (default: a
# free loopback port nobody listens on).

def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def standalone_inspect_obj(name: str, c: dict[str, Any]) -> dict[str, Any]:
    ports = {f"{cp}/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(hp)}]
             for cp, hp in c["ports"].items()}
    return {
        "Id": c["id"], "Name": "/" + name, "Image": "sha256:" + c["id"],
        "State": {"Status": "running" if c["running"] else "exited",
                  "Running": c["running"]},
        "Config": {"Image": c["image"], "Labels": c["labels"], "Env": c["env"]},
        "Mounts": [{"Type": "volume", "Name": v.split(":")[0],
                    "Destination": v.split(":", 1)[1]} for v in c["volumes"]],
        "NetworkSettings": {"Ports": ports if c["running"] else {},
                            "Networks": {n: {} for n in c["networks"]}},
    }


def docker_standalone(state: State, cmd: str, sub: str | None, args: list[str]) -> None:
    docker_require_up(state)
    if cmd == "run":
        try:
            opts, pos, _ = parse_flags(args, [
                F("detach/d", "bool"), F("name"), F("restart"), F("label/l", "array"),
                F("env/e", "array"), F("volume/v", "array"), F("publish/p", "array"),
                F("network")], interspersed=False)
        except UsageError as e:
            raise docker_usage_error("run", str(e)) from None
        if not pos:
            raise docker_usage_error("run", '"docker run" requires at least 1 argument.')
    with state.locked():
        d = docker_state(state)
        cs = d.setdefault("standalone", {})
        vols = d.setdefault("volumes", {})
        if cmd == "run":
            name = opts["name"]
            if name in cs:
                raise Exit(125, f'docker: Error response from daemon: Conflict. The container '
                                f'name "/{name}" is already in use by container '
                                f'"{cs[name]["id"]}". You have to remove (or rename) that '
                                "container to be able to reuse that name.")
            ports = {}
            for spec in opts["publish"]:
                cport = spec.rsplit(":", 1)[-1]
                host = spec.split(":")[1] if spec.count(":") == 2 else ""
                ports[cport] = int(host) if host else int(
                    (d.get("cachePorts") or {}).get(name) or _free_port())
            for v in opts["volume"]:
                vols.setdefault(v.split(":")[0], {"labels": {}})
            import hashlib

            cid = hashlib.sha256(name.encode()).hexdigest()
            cs[name] = {"id": cid, "image": pos[0],
                        "labels": dict(lbl.partition("=")[::2] for lbl in opts["label"]),
                        "env": opts["env"], "volumes": opts["volume"], "ports": ports,
                        "networks": [opts.get("network") or "bridge"], "running": True}
            out(cid)
        elif cmd == "rm":
            _, refs, _ = parse_flags(args, [F("force/f", "bool"), F("volumes/v", "bool")])
            errors = [f"Error response from daemon: No such container: {r}"
                      for r in refs if r not in cs]
            for r in refs:
                if cs.pop(r, None) is not None:
                    out(r)
            state.write("docker.json", d)
            if errors:
                raise Exit(1, "\n".join(errors))
        elif cmd == "volume":
            vopts, names, _ = parse_flags(args, [F("label", "array"), F("force/f", "bool"),
                                                 F("format"), F("quiet/q", "bool")])
            if sub == "create":
                vols.setdefault(names[0], {"labels": dict(
                    lbl.partition("=")[::2] for lbl in vopts["label"])})
                out(names[0])
            elif sub in ("rm", "remove"):
                missing = [n for n in names if n not in vols]
                for n in names:
                    vols.pop(n, None)
                state.write("docker.json", d)
                if missing and not vopts["force"]:
                    raise Exit(1, "\n".join(f"Error response from daemon: get {n}: no such "
                                            "volume" for n in missing))
            elif sub in ("ls", "list"):
                for n in sorted(vols):
                    out(n)
            else:
                raise Exit(1, f"docker: unknown command: docker volume {sub}")
        else:  # network connect|disconnect NETWORK CONTAINER
            _, pos, _ = parse_flags(args, [F("alias", "array"), F("force/f", "bool")])
            net, name = pos[0], pos[1]
            if net not in network_defs(state):
                raise Exit(1, f"Error response from daemon: network {net} not found")
            if name not in cs:
                raise Exit(1, f"Error response from daemon: No such container: {name}")
            nets = cs[name]["networks"]
            if sub == "connect":
                if net in nets:
                    raise Exit(1, f"Error response from daemon: endpoint with name {name} "
                                  f"already exists in network {net}")
                nets.append(net)
            elif net in nets:
                nets.remove(net)
        state.write("docker.json", d)


def docker_find_container(state: State, ref: str) -> dict[str, Any] | None:
    for rec in container_records(state):
        if ref in (rec["name"], "/" + rec["name"]) or (len(ref) >= 3 and
                                                       rec["id"].startswith(ref)):
            return rec
    return None


def docker_inspect(state: State, args: list[str], containers_only: bool) -> None:
    cmd = "container inspect" if containers_only else "inspect"
    try:
        opts, refs, _ = parse_flags(args, [F("format/f"), F("size/s", "bool"), F("type")])
    except UsageError as e:
        raise docker_usage_error(cmd, str(e)) from None
    if not refs:
        raise docker_usage_error(cmd, f'"docker {cmd}" requires at least 1 argument.')
    docker_require_up(state)
    nets = network_defs(state)
    typ = "container" if containers_only else opts.get("type")
    found, errors = [], []
    standalone = docker_state(state).get("standalone") or {}
    for ref in refs:
        if typ in (None, "container") and ref.lstrip("/") in standalone:
            found.append(standalone_inspect_obj(ref.lstrip("/"), standalone[ref.lstrip("/")]))
            continue
        rec = docker_find_container(state, ref) if typ in (None, "container") else None
        if rec is not None:
            found.append(container_inspect_obj(state, rec, nets.get(
                rec["cluster_rec"].get("network") or "kind")))
            continue
        if typ in (None, "network"):
            netsc = networks_with_containers(state)
            if ref in netsc:
                found.append(netsc[ref])
                continue
        if typ == "container":
            errors.append(f"Error response from daemon: No such container: {ref}")
        else:
            errors.append(f"Error: No such object: {ref}")
    docker_emit_inspect(opts.get("format"), found, errors,
                        transform=lambda o: _wrap_ipam(o) if "IPAM" in o else {**o, "ID": o["Id"]})


def docker_exec(state: State, args: list[str]) -> None:
    try:
        opts, pos, _ = parse_flags(args, [F("interactive/i", "bool"), F("tty/t", "bool"),
                                          F("detach/d", "bool"), F("env/e", "array"),
                                          F("env-file", "array"), F("privileged", "bool"),
                                          F("user/u"), F("workdir/w"), F("detach-keys")],
                                   interspersed=False)
    except UsageError as e:
        raise docker_usage_error("exec", str(e)) from None
    if len(pos) < 2:
        raise docker_usage_error("exec", '"docker exec" requires at least 2 arguments.')
    docker_require_up(state)
    ref, command = pos[0], pos[1:]
    standalone = (docker_state(state).get("standalone") or {}).get(ref)
    rec = docker_find_container(state, ref) if standalone is None else {
        "name": ref, "id": standalone["id"],
        "state": "running" if standalone["running"] else "exited"}
    if rec is None:
        raise Exit(1, f"Error response from daemon: No such container: {ref}")
    if rec["state"] != "running":
        raise Exit(1, f"Error response from daemon: container {rec['id']} is not running")
    if opts["interactive"]:
        with contextlib.suppress(OSError, ValueError):
            sys.stdin.buffer.read()
    joined = " ".join(command)
    for rule in docker_state(state).get("exec") or []:
        if rule.get("container") not in (None, rec["name"]):
            continue
        if rule.get("match") and not re.search(rule["match"], joined):
            continue
        if rule.get("stdout"):
            sys.stdout.write(rule["stdout"])
        if rule.get("stderr"):
            sys.stderr.write(rule["stderr"])
        code = int(rule.get("code", 0))
        if code:
            raise Exit(code)
        return


def docker_start_stop(state: State, cmd: str, args: list[str]) -> None:
    try:
        _, refs, _ = parse_flags(args, [F("time/t", "int"), F("signal/s"),
                                        F("attach/a", "bool"), F("interactive/i", "bool")])
    except UsageError as e:
        raise docker_usage_error(cmd, str(e)) from None
    if not refs:
        raise docker_usage_error(cmd, f'"docker {cmd}" requires at least 1 argument.')
    docker_require_up(state)
    errors = []
    with state.locked():
        d = docker_state(state)
        cs = d.setdefault("containers_state", {})
        for ref in refs:
            if ref in (d.get("standalone") or {}):
                d["standalone"][ref]["running"] = cmd in ("start", "restart")
                out(ref)
                continue
            rec = docker_find_container(state, ref)
            if rec is None:
                errors.append(f"Error response from daemon: No such container: {ref}")
                continue
            cs[rec["name"]] = "running" if cmd in ("start", "restart") else "exited"
            out(ref)
        state.write("docker.json", d)
    if errors:
        raise Exit(1, "\n".join(errors))


# ================================================================================================
# helm
# ================================================================================================

HELM_GLOBAL = [F("namespace/n"), F("kubeconfig"), F("kube-context"), F("kube-token"),
               F("kube-as-user"), F("kube-as-group", "array"), F("kube-apiserver"),
               F("kube-ca-file"), F("kube-tls-server-name"),
               F("kube-insecure-skip-tls-verify", "bool"), F("debug", "bool"),
               F("registry-config"), F("repository-config"), F("repository-cache"),
               F("burst-limit", "int"), F("qps", "float"), F("help/h", "bool")]
HELM_VALUES = [F("values/f", "slice"), F("set", "array"), F("set-string", "array"),
               F("set-file", "array"), F("set-json", "array"), F("set-literal", "array")]
HELM_CHART = [F("version"), F("verify", "bool"), F("keyring"), F("repo"), F("username"),
              F("password"), F("cert-file"), F("key-file"), F("insecure-skip-tls-verify", "bool"),
              F("plain-http", "bool"), F("ca-file"), F("pass-credentials", "bool")]
HELM_OUTPUT = [F("output/o", default="table")]
HELM_INSTALL_COMMON = [F("create-namespace", "bool"), F("devel", "bool"),
                       F("dry-run", noopt="client"), F("hide-secret", "bool"), F("force", "bool"),
                       F("no-hooks", "bool"), F("disable-openapi-validation", "bool"),
                       F("skip-crds", "bool"), F("timeout", "dur", default="5m0s"),
                       F("wait", "bool"), F("wait-for-jobs", "bool"), F("atomic", "bool"),
                       F("render-subchart-notes", "bool"), F("hide-notes", "bool"),
                       F("skip-schema-validation", "bool"), F("labels/l", "map"), F("description"),
                       F("dependency-update", "bool"), F("enable-dns", "bool"),
                       F("take-ownership", "bool"), F("post-renderer"),
                       F("post-renderer-args", "array"), *HELM_VALUES, *HELM_CHART, *HELM_OUTPUT]
HELM_CMDS: dict[tuple[str, ...], list[Flag]] = {
    ("version",): [F("short", "bool"), F("template")],
    ("repo", "add"): [F("username"), F("password"), F("password-stdin", "bool"),
                      F("force-update", "bool"), F("no-update", "bool"), F("cert-file"),
                      F("key-file"), F("ca-file"), F("insecure-skip-tls-verify", "bool"),
                      F("allow-deprecated-repos", "bool"), F("pass-credentials", "bool")],
    ("repo", "update"): [F("fail-on-repo-update-fail", "bool")],
    ("repo", "list"): HELM_OUTPUT,
    ("repo", "remove"): [],
    ("search", "repo"): [F("version"), F("devel", "bool"), F("regexp/r", "bool"),
                         F("versions/l", "bool"), F("max-col-width", "int"),
                         F("fail-on-no-result", "bool"), *HELM_OUTPUT],
    ("upgrade",): [*HELM_INSTALL_COMMON, F("install/i", "bool"), F("recreate-pods", "bool"),
                   F("reset-values", "bool"), F("reuse-values", "bool"),
                   F("reset-then-reuse-values", "bool"), F("history-max", "int"),
                   F("cleanup-on-fail", "bool")],
    ("install",): [*HELM_INSTALL_COMMON, F("generate-name/g", "bool"), F("name-template"),
                   F("replace", "bool")],
    ("status",): [F("revision", "int"), F("show-desc", "bool"), F("show-resources", "bool"),
                  *HELM_OUTPUT],
    ("list",): [F("short/q", "bool"), F("no-headers", "bool"), F("time-format"),
                F("date/d", "bool"), F("reverse/r", "bool"), F("all/a", "bool"),
                F("uninstalled", "bool"), F("superseded", "bool"), F("uninstalling", "bool"),
                F("deployed", "bool"), F("failed", "bool"), F("pending", "bool"),
                F("all-namespaces/A", "bool"), F("max/m", "int"), F("offset", "int"),
                F("filter/f"), F("selector/l"), *HELM_OUTPUT],
    ("get", "values"): [F("revision", "int"), F("all/a", "bool"), *HELM_OUTPUT],
    ("get", "metadata"): [F("revision", "int"), *HELM_OUTPUT],
    ("uninstall",): [F("dry-run", "bool"), F("no-hooks", "bool"), F("ignore-not-found", "bool"),
                     F("keep-history", "bool"), F("wait", "bool"), F("cascade"),
                     F("timeout", "dur"), F("description")],
    ("rollback",): [F("dry-run", "bool"), F("recreate-pods", "bool"), F("force", "bool"),
                    F("no-hooks", "bool"), F("timeout", "dur"), F("wait", "bool"),
                    F("wait-for-jobs", "bool"), F("cleanup-on-fail", "bool"),
                    F("history-max", "int")],
    ("history",): [F("max", "int"), *HELM_OUTPUT],
}
HELM_TREE: dict[str, Any] = {
    "version": None, "repo": {"add": None, "update": None, "list": None, "remove": None,
                              "__aliases__": {"up": "update", "ls": "list", "rm": "remove"}},
    "search": {"repo": None, "hub": None},
    "upgrade": None, "install": None, "status": None, "list": None, "history": None,
    "get": {"values": None, "manifest": None, "all": None, "notes": None, "hooks": None,
            "metadata": None},
    "uninstall": None, "rollback": None,
    "__aliases__": {"ls": "list", "delete": "uninstall", "del": "uninstall", "un": "uninstall",
                    "hist": "history"},
}
HELM_ARGS = {  # (min, max, usage)
    ("repo", "add"): (2, 2, "helm repo add [NAME] [URL] [flags]"),
    ("repo", "remove"): (1, 99, "helm repo remove [REPO1 [REPO2 ...]] [flags]"),
    ("search", "repo"): (0, 1, "helm search repo [keyword] [flags]"),
    ("upgrade",): (2, 2, "helm upgrade [RELEASE] [CHART] [flags]"),
    ("install",): (1, 2, "helm install [NAME] [CHART] [flags]"),
    ("status",): (1, 1, "helm status RELEASE_NAME [flags]"),
    ("list",): (0, 0, "helm list [flags]"),
    ("get", "values"): (1, 1, "helm get values RELEASE_NAME [flags]"),
    ("get", "metadata"): (1, 1, "helm get metadata RELEASE_NAME [flags]"),
    ("uninstall",): (1, 99, "helm uninstall RELEASE_NAME [...] [flags]"),
    ("rollback",): (1, 2, "helm rollback <RELEASE> [REVISION] [flags]"),
    ("history",): (1, 1, "helm history RELEASE_NAME [flags]"),
    ("version",): (0, 0, "helm version [flags]"),
}

HELM_CLUSTER_SCOPED = {
    "Namespace", "Node", "PersistentVolume", "CustomResourceDefinition", "ClusterRole",
    "ClusterRoleBinding", "StorageClass", "PriorityClass", "IngressClass", "APIService",
    "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "GatewayClass",
    "ClusterIssuer", "CiliumLoadBalancerIPPool", "CiliumL2AnnouncementPolicy",
    "CiliumClusterwideNetworkPolicy", "CiliumNode", "CiliumIdentity", "CSIDriver", "CSINode",
    "RuntimeClass", "VolumeAttachment", "CiliumBGPClusterConfig", "CiliumExternalWorkload",
    "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "FlowSchema",
    "PriorityLevelConfiguration", "CertificateSigningRequest",
}
HELM_PLURALS = {
    "Deployment": "deployments", "DaemonSet": "daemonsets", "Service": "services",
    "ConfigMap": "configmaps", "Secret": "secrets", "Pod": "pods", "Namespace": "namespaces",
    "ServiceAccount": "serviceaccounts",
    "CustomResourceDefinition": "customresourcedefinitions", "GatewayClass": "gatewayclasses",
    "Endpoints": "endpoints", "Ingress": "ingresses", "IngressClass": "ingressclasses",
    "NetworkPolicy": "networkpolicies", "PodDisruptionBudget": "poddisruptionbudgets",
    "StorageClass": "storageclasses",
}
HELM_INSTALL_ORDER = [
    "PriorityClass", "Namespace", "NetworkPolicy", "ResourceQuota", "LimitRange",
    "PodSecurityPolicy", "PodDisruptionBudget", "ServiceAccount", "Secret", "SecretList",
    "ConfigMap", "StorageClass", "PersistentVolume", "PersistentVolumeClaim",
    "CustomResourceDefinition", "ClusterRole", "ClusterRoleList", "ClusterRoleBinding",
    "ClusterRoleBindingList", "Role", "RoleList", "RoleBinding", "RoleBindingList", "Service",
    "DaemonSet", "Pod", "ReplicationController", "ReplicaSet", "Deployment",
    "HorizontalPodAutoscaler", "StatefulSet", "Job", "CronJob", "IngressClass", "Ingress",
    "APIService",
]


def helm_error(msg: str) -> Exit:
    return Exit(1, f"Error: {msg}")


def plural_for(kind: str) -> str:
    if kind in HELM_PLURALS:
        return HELM_PLURALS[kind]
    low = kind.lower()
    if low.endswith("y") and low[-2:-1] not in "aeiou":
        return low[:-1] + "ies"
    if low.endswith(("s", "x", "ch", "sh")):
        return low + "es"
    return low + "s"


def go_time_json(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e9):09d}Z"


def go_time_string(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) + \
        f".{int((t % 1) * 1e9):09d} +0000 UTC"


def go_time_ansic(t: float) -> str:
    s = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(t))
    return s[:8] + (" " + s[9] if s[8] == "0" else s[8:10]) + s[10:]


class HelmCtx:
    """Resolved kube settings of one helm invocation."""

    def __init__(self, opts: dict[str, Any]) -> None:
        self.kubeconfig = opts.get("kubeconfig") or None
        self.kc = load_merged_kubeconfig(self.kubeconfig)
        self.context = (opts.get("kube-context") or os.environ.get("HELM_KUBECONTEXT")
                        or self.kc["current-context"] or "")
        ctx_ns = (self.kc["contexts"].get(self.context) or {}).get("namespace")
        self.namespace = (opts.get("namespace") or os.environ.get("HELM_NAMESPACE")
                          or ctx_ns or "default")
        self.api_server = opts.get("kube-apiserver")
        self.token = opts.get("kube-token")

    def check_reachable(self) -> None:
        if self.api_server:
            return
        if not self.context:
            raise helm_error('Kubernetes cluster unreachable: Get "http://localhost:8080/version":'
                             " dial tcp 127.0.0.1:8080: connect: connection refused")
        if self.context not in self.kc["contexts"]:
            raise helm_error(f'Kubernetes cluster unreachable: context "{self.context}" does not '
                             "exist")

    def server(self) -> tuple[str, dict[str, str]]:
        if self.api_server:
            return self.api_server.rstrip("/"), self._auth({})
        ctx = self.kc["contexts"].get(self.context) or {}
        cluster = self.kc["clusters"].get(ctx.get("cluster")) or {}
        user = self.kc["users"].get(ctx.get("user")) or {}
        return str(cluster.get("server") or "http://localhost:8080").rstrip("/"), self._auth(user)

    def _auth(self, user: dict[str, Any]) -> dict[str, str]:
        tok = self.token or user.get("token")
        return {"Authorization": f"Bearer {tok}"} if tok else {}


# ---- values ------------------------------------------------------------------------------------


def _split_unescaped(s: str, sep: str) -> list[str]:
    parts, cur, depth, i = [], [], 0, 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            cur.append(s[i:i + 2])
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth = max(0, depth - 1)
        if c == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _typed(v: str, as_string: bool) -> Any:
    if as_string:
        return v
    low = v.lower()
    if low == "true":
        return True
    if low == "false":
        return False
    if low == "null":
        return None
    if v == "0":
        return 0
    if v and v[0] != "0" and re.fullmatch(r"[-+]?\d+", v):
        return int(v)
    return v


def _unescape(s: str) -> str:
    return re.sub(r"\\(.)", r"\1", s)


def _set_path(target: dict[str, Any], key: str, value: Any) -> None:
    parts = [_unescape(p) for p in _split_unescaped(key, ".")]
    cur: Any = target
    for n, p in enumerate(parts):
        m = re.fullmatch(r"(.*?)\[(\d+)\]", p)
        last = n == len(parts) - 1
        if m:
            name, idx = m.group(1), int(m.group(2))
            lst = cur.setdefault(name, []) if isinstance(cur.get(name), list) else None
            if lst is None:
                cur[name] = lst = []
            while len(lst) <= idx:
                lst.append(None)
            if last:
                lst[idx] = value
            else:
                if not isinstance(lst[idx], dict):
                    lst[idx] = {}
                cur = lst[idx]
        elif last:
            cur[p] = value
        else:
            if not isinstance(cur.get(p), dict):
                cur[p] = {}
            cur = cur[p]


def helm_parse_set(target: dict[str, Any], spec: str, mode: str) -> None:
    if mode == "literal":
        k, _, v = spec.partition("=")
        _set_path(target, k, v)
        return
    for item in _split_unescaped(spec, ","):
        if not item:
            continue
        if "=" not in item:
            raise helm_error(f'failed parsing --set data: key "{item}" has no value')
        k, _, v = item.partition("=")
        if mode == "json":
            try:
                val: Any = json.loads(v)
            except ValueError as e:
                raise helm_error(f"failed parsing --set-json data {spec}: {e}") from None
        elif mode == "file":
            try:
                with open(v, encoding="utf-8") as fh:
                    val = fh.read()
            except OSError as e:
                raise helm_error(f"failed parsing --set-file data: open {v}: {e.strerror}") \
                    from None
        elif v.startswith("{") and v.endswith("}"):
            val = [_typed(_unescape(x), mode == "string") for x in _split_unescaped(v[1:-1], ",")
                   if x != ""]
        else:
            val = _typed(_unescape(v), mode == "string")
        _set_path(target, k, val)


def helm_merge_values(opts: dict[str, Any]) -> dict[str, Any]:
    base: dict[str, Any] = {}
    yaml = yaml_mod()
    for f in opts.get("values") or []:
        try:
            if f == "-":
                text = sys.stdin.read()
            else:
                with open(f, encoding="utf-8") as fh:
                    text = fh.read()
        except OSError as e:
            raise helm_error(f"open {f}: {(e.strerror or str(e)).lower()}") from None
        try:
            data = yaml_load(text) or {}
        except yaml.YAMLError as e:
            raise helm_error(f"failed to parse {f}: error converting YAML to JSON: {e}") from None
        if not isinstance(data, dict):
            raise helm_error(f"failed to parse {f}: error unmarshaling JSON: json: cannot "
                             "unmarshal array into Go value of type map[string]interface {}")
        base = deep_merge(base, data)
    for mode, flag in (("json", "set-json"), ("plain", "set"), ("string", "set-string"),
                       ("file", "set-file"), ("literal", "set-literal")):
        for spec in opts.get(flag) or []:
            helm_parse_set(base, spec, mode)
    return base


# ---- charts ------------------------------------------------------------------------------------


def chart_basename(ref: str) -> str:
    base = ref.rstrip("/").rsplit("/", 1)[-1]
    base = re.sub(r"\.tgz$|\.tar\.gz$", "", base)
    base = base.split(":", 1)[0] if ref.startswith("oci://") else base
    m = re.fullmatch(r"(.+?)-v?\d+\.\d+\.\d+.*", base)
    if m and (ref.startswith(("http://", "https://")) or ref.endswith((".tgz", ".tar.gz"))):
        base = m.group(1)
    return base


def chart_dir(state: State, name: str) -> str:
    return state.path(os.path.join("charts", name))


def chart_meta(state: State, ref: str, version: str | None) -> dict[str, Any]:
    name = chart_basename(ref)
    meta = {"name": name, "version": version or "", "appVersion": "", "apiVersion": "v2"}
    for cand in (os.path.join(chart_dir(state, name), "Chart.yaml"),
                 os.path.join(ref, "Chart.yaml")):
        if os.path.isfile(cand):
            with contextlib.suppress(Exception), open(cand, encoding="utf-8") as fh:
                data = yaml_load(fh.read()) or {}
                meta["name"] = data.get("name", name)
                meta["version"] = version or str(data.get("version", ""))
                meta["appVersion"] = str(data.get("appVersion", ""))
            break
    if not meta["version"]:
        meta["version"] = "0.1.0"
        meta["defaulted"] = True
    if not meta["appVersion"]:
        meta["appVersion"] = meta["version"]
    return meta


def chart_default_values(state: State, name: str) -> dict[str, Any]:
    p = os.path.join(chart_dir(state, name), "values.yaml")
    if os.path.isfile(p):
        with contextlib.suppress(Exception), open(p, encoding="utf-8") as fh:
            data = yaml_load(fh.read())
            if isinstance(data, dict):
                return data
    return {}


def chart_objects(state: State, name: str, release: str, namespace: str
                  ) -> list[dict[str, Any]] | None:
    d = chart_dir(state, name)
    files: list[str] = []
    for sub in ("", "templates"):
        p = os.path.join(d, sub)
        if os.path.isdir(p):
            files += [os.path.join(p, f) for f in sorted(os.listdir(p))
                      if f.endswith((".yaml", ".yml")) and f not in ("Chart.yaml", "values.yaml")]
    if not files:
        return None
    objs: list[dict[str, Any]] = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            text = fh.read()
        text = re.sub(r"\{\{-?\s*\.Release\.Namespace\s*-?\}\}", namespace, text)
        text = re.sub(r"\{\{-?\s*\.Release\.Name\s*-?\}\}", release, text)
        for doc in yaml_load_all(text):
            if isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"):
                objs.append(doc)
    order = {k: i for i, k in enumerate(HELM_INSTALL_ORDER)}
    objs.sort(key=lambda o: order.get(o["kind"], len(order)))
    return objs


def _http(method: str, url: str, body: Any, headers: dict[str, str]
          ) -> tuple[int, dict[str, Any]]:
    import ssl
    import urllib.error
    import urllib.request

    handlers: list[Any] = [urllib.request.ProxyHandler({})]
    if url.startswith("https://"):
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    opener = urllib.request.build_opener(*handlers)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Accept": "application/json", "Content-Type": "application/json",
        "User-Agent": f"Helm/{HELM_VERSION.lstrip('v')}", **headers})
    try:
        with opener.open(req, timeout=15) as resp:
            raw = resp.read()
            code = resp.status
    except urllib.error.HTTPError as e:
        raw = e.read()
        code = e.code
    try:
        parsed = json.loads(raw) if raw else {}
    except ValueError:
        parsed = {"message": raw.decode(errors="replace")}
    return code, parsed if isinstance(parsed, dict) else {"items": parsed}


class ApplyError(Exception):
    pass


def _conn_error(method: str, url: str, exc: Exception) -> ApplyError:
    import urllib.parse

    reason = getattr(exc, "reason", exc)
    hostport = urllib.parse.urlsplit(url).netloc
    if isinstance(reason, ConnectionRefusedError):
        detail = f"dial tcp {hostport}: connect: connection refused"
    else:
        detail = str(reason)
    return ApplyError(f'Kubernetes cluster unreachable: {method.title()} "{url}": {detail}')


def object_path(obj: dict[str, Any], release_ns: str) -> tuple[str, str]:
    av, kind = obj["apiVersion"], obj["kind"]
    prefix = "/api/v1" if av == "v1" else f"/apis/{av}"
    plural = plural_for(kind)
    meta = obj.setdefault("metadata", {})
    if kind in HELM_CLUSTER_SCOPED:
        meta.pop("namespace", None)
        coll = f"{prefix}/{plural}"
    else:
        ns = meta.get("namespace") or release_ns
        meta["namespace"] = ns
        coll = f"{prefix}/namespaces/{ns}/{plural}"
    return coll, f"{coll}/{meta.get('name', '')}"


def apply_chart(hctx: HelmCtx, objs: list[dict[str, Any]], release: str, namespace: str,
                create_ns: bool) -> None:
    base, headers = hctx.server()
    try:
        code, _ = _http("GET", base + "/version", None, headers)
    except OSError as e:
        raise _conn_error("GET", base + "/version", e) from None
    if create_ns:
        with contextlib.suppress(OSError):
            _http("POST", base + "/api/v1/namespaces",
                  {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
                  headers)
    for obj in objs:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("labels", {})["app.kubernetes.io/managed-by"] = "Helm"
        ann = meta.setdefault("annotations", {})
        ann["meta.helm.sh/release-name"] = release
        ann["meta.helm.sh/release-namespace"] = namespace
        coll, item = object_path(obj, namespace)
        try:
            # helm reads the object first and updates what exists (a POST of a Service that exists
            # is refused for its clusterIP before its name: allocation comes first)
            gcode, cur = _http("GET", base + item, None, headers)
            rv = (cur.get("metadata") or {}).get("resourceVersion") if gcode == 200 else None
            if rv:
                meta["resourceVersion"] = rv
                code, resp = _http("PUT", base + item, obj, headers)
            else:
                code, resp = _http("POST", base + coll, obj, headers)
            if code == 404 and coll.count("/") >= 3:
                raise ApplyError(
                    "unable to build kubernetes objects from release manifest: resource mapping "
                    f'not found for name: "{meta.get("name")}" namespace: "'
                    f'{meta.get("namespace", "")}" from "": no matches for kind "{obj["kind"]}" '
                    f'in version "{obj["apiVersion"]}"\nensure CRDs are installed first')
            if code >= 400:
                raise ApplyError(resp.get("message") or
                                 f"the server responded with status code {code}")
            if "status" in obj:
                rv = (resp.get("metadata") or {}).get("resourceVersion")
                if rv:
                    meta["resourceVersion"] = rv
                scode, sresp = _http("PUT", base + item + "/status", obj, headers)
                if scode >= 400:
                    raise ApplyError(sresp.get("message") or
                                     f"the server responded with status code {scode} "
                                     f"(status of {obj['kind']} {meta.get('name')})")
        except OSError as e:
            raise _conn_error("POST", base + coll, e) from None


def delete_chart(hctx: HelmCtx, objs: list[dict[str, Any]], namespace: str) -> None:
    base, headers = hctx.server()
    for obj in reversed(objs):
        _, item = object_path(copy.deepcopy(obj), namespace)
        with contextlib.suppress(OSError):
            _http("DELETE", base + item, None, headers)


# ---- release records ---------------------------------------------------------------------------


def helm_releases(state: State) -> dict[str, Any]:
    return state.read("helm.json", {}) or {}


def sort_deep(v: Any) -> Any:
    """Go marshals maps with sorted keys: values print that way."""
    if isinstance(v, dict):
        return {k: sort_deep(v[k]) for k in sorted(v)}
    if isinstance(v, list):
        return [sort_deep(x) for x in v]
    return v


def release_view(rec: dict[str, Any], rev: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON helm prints for ``status -o json`` (a release object)."""
    r = rev or rec["history"][-1]
    info = {"first_deployed": go_time_json(r["first_deployed"]),
            "last_deployed": go_time_json(r["last_deployed"]), "deleted": "",
            "description": r.get("description", ""), "status": r["status"]}
    if r.get("notes"):
        info["notes"] = r["notes"]
    return {
        "name": rec["name"], "info": info,
        "chart": {"metadata": {"name": r["chart"], "version": r["version"],
                               "appVersion": r.get("app_version", ""), "apiVersion": "v2"},
                  "lock": None, "templates": [], "values": {}, "schema": None, "files": []},
        "config": sort_deep(r.get("values") or {}), "manifest": r.get("manifest", ""),
        "version": r["revision"], "namespace": rec["namespace"],
    }


def _sync_top(rec: dict[str, Any]) -> None:
    last = rec["history"][-1]
    for k in ("revision", "status", "chart", "chart_ref", "version", "app_version", "values",
              "description"):
        rec[k] = last.get(k)


def helm_status_table(view: dict[str, Any], show_desc: bool = False) -> str:
    lines = [f"NAME: {view['name']}",
             "LAST DEPLOYED: " + go_time_ansic(_parse_json_time(view["info"]["last_deployed"])),
             f"NAMESPACE: {view['namespace']}", f"STATUS: {view['info']['status']}",
             f"REVISION: {view['version']}"]
    if show_desc:
        lines.append(f"DESCRIPTION: {view['info']['description']}")
    lines.append("TEST SUITE: None")
    if view["info"].get("notes"):
        lines.append("NOTES:\n" + view["info"]["notes"].strip())
    return "\n".join(lines)


def _parse_json_time(s: str) -> float:
    import calendar

    base, _, frac = s.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + float("0." + (frac or "0"))


def helm_output(fmt: str, data: Any, table: Callable[[], str]) -> None:
    if fmt == "json":
        out(json.dumps(data, separators=(",", ":")))
    elif fmt == "yaml":
        out(yaml_dump(data).rstrip("\n"))
    elif fmt == "table":
        out(table())
    else:
        raise helm_error(f'invalid argument "{fmt}" for "-o, --output" flag: invalid format type')


def helm_main(state: State, argv: list[str]) -> None:
    all_flags = HELM_GLOBAL + [f for fl in HELM_CMDS.values() for f in fl]
    path, rest = split_command(argv, HELM_TREE, value_flag_tokens(all_flags))
    if not path:
        if "--version" in rest or "-v" in rest:
            out(f"{HELM_VERSION}+g{HELM_COMMIT[:7]}")
            return
        try:
            parse_flags(rest, HELM_GLOBAL)
        except UsageError as e:
            raise helm_error(str(e)) from None
        out("The Kubernetes package manager\n\nUsage:\n  helm [command]")
        return
    if path[0] not in HELM_TREE:
        raise helm_error(f'unknown command "{path[0]}" for "helm"\nRun \'helm --help\' for '
                         "usage.")
    if isinstance(HELM_TREE[path[0]], dict) and len(path) == 1:
        raise helm_error(f'unknown command "{rest[0] if rest else ""}" for "helm {path[0]}"'
                         if rest and not rest[0].startswith("-") else
                         f"Usage:\n  helm {path[0]} [command]")
    key = tuple(path)
    if key not in HELM_CMDS:
        raise helm_error(f'fake helm does not implement "helm {" ".join(path)}"')
    try:
        opts, pos, changed = parse_flags(rest, HELM_GLOBAL + HELM_CMDS[key])
    except UsageError as e:
        raise helm_error(str(e)) from None
    lo, hi, usage = HELM_ARGS.get(key, (0, 99, ""))
    if not lo <= len(pos) <= hi:
        shown = "helm " + " ".join(path)
        if lo == hi:
            want = f"{lo} argument{'s' if lo != 1 else ''}"
            msg = f'"{shown}" requires {want}' if lo else f'"{shown}" accepts no arguments'
        elif len(pos) < lo:
            msg = f'"{shown}" requires at least {lo} argument{"s" if lo != 1 else ""}'
        else:
            msg = f'"{shown}" accepts at most {hi} arguments'
        raise helm_error(f"{msg}\n\nUsage:  {usage}")
    keys = injection_keys("helm", path)
    if key == ("install",):  # `helm install` honours helm:upgrade injections too
        keys = list(dict.fromkeys(keys + injection_keys("helm", ["upgrade"])))
    if key in (("upgrade",), ("install",)):
        helm_upgrade(state, key[0], opts, pos, changed, keys)
        return
    fail = injected_failure(state, keys)
    if fail is not None:
        raise fail_with(fail, HELM_FAIL_DEFAULTS.get(key[0], "Error: injected failure"))
    do_sleep(injected_sleep(state, keys))
    if key == ("version",):
        if opts.get("template"):
            try:
                out(render_go_template(opts["template"], {
                    "Version": HELM_VERSION, "GitCommit": HELM_COMMIT, "GitTreeState": "clean",
                    "GoVersion": HELM_GO}), end="")
            except TemplateError as e:
                raise helm_error(str(e)) from None
        elif opts.get("short"):
            out(f"{HELM_VERSION}+g{HELM_COMMIT[:7]}")
        else:
            out(f'version.BuildInfo{{Version:"{HELM_VERSION}", GitCommit:"{HELM_COMMIT}", '
                f'GitTreeState:"clean", GoVersion:"{HELM_GO}"}}')
    elif key[0] == "repo":
        helm_repo(state, key[1], opts, pos)
    elif key == ("search", "repo"):
        helm_search_repo(state, opts, pos)
    elif key == ("status",):
        hctx = HelmCtx(opts)
        hctx.check_reachable()
        rec = helm_releases(state).get(hctx.context, {}).get(f"{hctx.namespace}/{pos[0]}")
        if not rec:
            raise helm_error("release: not found")
        rev = None
        if opts.get("revision"):
            rev = next((h for h in rec["history"] if h["revision"] == opts["revision"]), None)
            if rev is None:
                raise helm_error("release: not found")
        view = release_view(rec, rev)
        # helm's status command drops the chart before printing (cmd/helm/status.go: Chart = nil)
        view.pop("chart", None)
        helm_output(opts["output"], view, lambda: helm_status_table(view, opts["show-desc"]))
    elif key == ("list",):
        helm_list(state, opts)
    elif key == ("history",):
        hctx = HelmCtx(opts)
        hctx.check_reachable()
        rec = helm_releases(state).get(hctx.context, {}).get(f"{hctx.namespace}/{pos[0]}")
        if not rec:
            raise helm_error("release: not found")
        hist = rec["history"][-opts["max"]:] if opts.get("max") else rec["history"]
        rows = [{"revision": h["revision"], "updated": go_time_ansic(h["last_deployed"]),
                 "status": h["status"], "chart": f"{h['chart']}-{h['version']}",
                 "app_version": h.get("app_version", ""), "description": h.get("description", "")}
                for h in hist]
        helm_output(opts["output"], rows, lambda: "\n".join(
            ["REVISION\tUPDATED                 \tSTATUS    \tCHART          \tAPP VERSION\t"
             "DESCRIPTION"] + [f"{r['revision']:<8}\t{r['updated']}\t{r['status']:<10}\t"
                               f"{r['chart']:<15}\t{r['app_version']:<11}\t{r['description']}"
                               for r in rows]))
    elif key == ("get", "metadata"):
        hctx = HelmCtx(opts)
        hctx.check_reachable()
        rec = helm_releases(state).get(hctx.context, {}).get(f"{hctx.namespace}/{pos[0]}")
        if not rec:
            raise helm_error("release: not found")
        rev = rec["history"][-1]
        meta = {"name": rec["name"], "chart": rev["chart"], "version": rev["version"],
                "appVersion": rev.get("app_version", ""), "namespace": rec["namespace"],
                "revision": rev["revision"], "status": rev["status"],
                "deployedAt": go_time_json(rev["last_deployed"])}
        helm_output(opts["output"], meta, lambda: "\n".join(
            f"{k.upper()}: {v}" for k, v in meta.items()))
    elif key == ("get", "values"):
        hctx = HelmCtx(opts)
        hctx.check_reachable()
        rec = helm_releases(state).get(hctx.context, {}).get(f"{hctx.namespace}/{pos[0]}")
        if not rec:
            raise helm_error("release: not found")
        rev = rec["history"][-1]
        if opts.get("revision"):
            rev = next((h for h in rec["history"] if h["revision"] == opts["revision"]), None)
            if rev is None:
                raise helm_error("release: not found")
        vals = rev.get("values") or {}
        if opts["all"]:
            vals = deep_merge(chart_default_values(state, rev["chart"]), vals)
        vals = sort_deep(vals)
        header = "COMPUTED VALUES:" if opts["all"] else "USER-SUPPLIED VALUES:"
        helm_output(opts["output"], vals,
                    lambda: header + "\n" + (yaml_dump(vals).rstrip("\n") if vals else "{}"))
    elif key == ("uninstall",):
        helm_uninstall(state, opts, pos)
    elif key == ("rollback",):
        helm_rollback(state, opts, pos)


HELM_FAIL_DEFAULTS = {
    "repo": 'Error: looks like "https://helm.cilium.io/" is not a valid chart repository or '
            "cannot be reached: Get \"https://helm.cilium.io/index.yaml\": dial tcp: lookup "
            "helm.cilium.io: no such host",
    "uninstall": "Error: failed to delete release: injected failure",
    "status": "Error: Kubernetes cluster unreachable: Get \"https://127.0.0.1:6443/version\": "
              "dial tcp 127.0.0.1:6443: connect: connection refused",
    "list": "Error: Kubernetes cluster unreachable: Get \"https://127.0.0.1:6443/version\": "
            "dial tcp 127.0.0.1:6443: connect: connection refused",
    "rollback": "Error: injected failure",
    "get": "Error: Kubernetes cluster unreachable: Get \"https://127.0.0.1:6443/version\": "
           "dial tcp 127.0.0.1:6443: connect: connection refused",
}


def repo_index_snapshot(state: State, url: str) -> Any:
    """What `repo add`/`repo update` download: ``helm-index.json`` {URL: {chart: [versions]}};
    a URL not listed there serves every chart at every version ("*")."""
    table = state.read("helm-index.json", {}) or {}
    return copy.deepcopy(table.get(url, "*"))


def helm_search_repo(state: State, opts: dict[str, Any], pos: list[str]) -> None:
    """``helm search repo`` over the local index snapshots (cmd/helm/search_repo.go)."""
    keyword = pos[0] if pos else ""
    want = (opts.get("version") or "").lstrip("=v")
    rows = []
    for name, repo in sorted((state.read("helm-repos.json", {}) or {}).items()):
        index = repo.get("index")
        if index is None:
            err(f'WARNING: Repo "{name}" is corrupt or missing. Try \'helm repo update\'.')
            continue
        charts = {keyword.split("/", 1)[-1]: ["*"]} if index == "*" else index
        for chart, versions in sorted(charts.items()):
            full = f"{name}/{chart}"
            if keyword not in full:
                continue
            for v in versions:
                if v == "*":
                    v = opts.get("version") or "0.1.0"
                if want and v.lstrip("v") != want:
                    continue
                rows.append({"name": full, "version": v, "app_version": v,
                             "description": f"{chart} (fake index)"})
    helm_output(opts["output"], rows, lambda: "No results found" if not rows else "\n".join(
        ["NAME\tCHART VERSION\tAPP VERSION\tDESCRIPTION"]
        + [f"{r['name']}\t{r['version']}\t{r['app_version']}\t{r['description']}"
           for r in rows]))


def helm_repo(state: State, sub: str, opts: dict[str, Any], pos: list[str]) -> None:
    with state.locked():
        repos = state.read("helm-repos.json", {}) or {}
        if sub == "add":
            name, url = pos
            if "/" in name:
                raise helm_error(f"repository name ({name}) contains '/', please specify a "
                                 "different name without '/'")
            entry = {"name": name, "url": url}
            if name in repos and not opts.get("force-update"):
                if repos[name].get("url") != url:
                    raise helm_error(f"repository name ({name}) already exists, please specify "
                                     "a different name")
                out(f'"{name}" already exists with the same configuration, skipping')
                return
            repos[name] = {**entry, "added": time.time(),
                           "index": repo_index_snapshot(state, url)}
            state.write("helm-repos.json", repos)
            out(f'"{name}" has been added to your repositories')
        elif sub == "update":
            if not repos:
                raise helm_error("no repositories found. You must add one before updating")
            names = pos or sorted(repos)
            for n in pos:
                if n not in repos:
                    raise helm_error(f"no repositories found matching '{n}'.  Nothing will be "
                                     "updated")
            out("Hang tight while we grab the latest from your chart repositories...")
            for n in names:
                repos[n]["updated"] = time.time()
                repos[n]["index"] = repo_index_snapshot(state, repos[n]["url"])
                out(f'...Successfully got an update from the "{n}" chart repository')
            state.write("helm-repos.json", repos)
            out("Update Complete. ⎈Happy Helming!⎈")
        elif sub == "list":
            if not repos:
                raise helm_error("no repositories to show")
            rows = [{"name": r["name"], "url": r["url"]} for r in repos.values()]
            helm_output(opts["output"], rows, lambda: "\n".join(
                ["NAME  \tURL"] + [f"{r['name']}\t{r['url']}" for r in rows]))
        elif sub == "remove":
            for n in pos:
                if n not in repos:
                    raise helm_error(f"no repo named \"{n}\" found")
                del repos[n]
                out(f'"{n}" has been removed from your repositories')
            state.write("helm-repos.json", repos)


def helm_list(state: State, opts: dict[str, Any]) -> None:
    hctx = HelmCtx(opts)
    hctx.check_reachable()
    rels = helm_releases(state).get(hctx.context, {})
    states: set[str] = set()
    for flag, st in (("deployed", "deployed"), ("failed", "failed"), ("superseded", "superseded"),
                     ("uninstalled", "uninstalled"), ("uninstalling", "uninstalling")):
        if opts.get(flag):
            states.add(st)
    if opts.get("pending"):
        states |= {"pending-install", "pending-upgrade", "pending-rollback"}
    if opts.get("all"):
        states = {"deployed", "failed", "superseded", "uninstalled", "uninstalling",
                  "pending-install", "pending-upgrade", "pending-rollback", "unknown"}
    if not states:
        states = {"deployed", "failed"}
    rows = []
    for rec in rels.values():
        if not opts.get("all-namespaces") and rec["namespace"] != hctx.namespace:
            continue
        last = rec["history"][-1]
        if last["status"] not in states:
            continue
        if opts.get("filter") and not re.search(opts["filter"], rec["name"]):
            continue
        rows.append({"name": rec["name"], "namespace": rec["namespace"],
                     "revision": str(last["revision"]),
                     "updated": go_time_string(last["last_deployed"]), "status": last["status"],
                     "chart": f"{last['chart']}-{last['version']}",
                     "app_version": last.get("app_version", ""), "_t": last["last_deployed"]})
    rows.sort(key=(lambda r: r["_t"]) if opts.get("date") else (lambda r: r["name"]),
              reverse=bool(opts.get("reverse")))
    for r in rows:
        r.pop("_t")
    if opts.get("short"):
        for r in rows:
            out(r["name"])
        return
    helm_output(opts["output"], rows, lambda: "\n".join(
        ([] if opts.get("no-headers") else
         ["NAME\tNAMESPACE\tREVISION\tUPDATED\tSTATUS\tCHART\tAPP VERSION"]) +
        [f"{r['name']}\t{r['namespace']}\t{r['revision']}\t{r['updated']}\t{r['status']}\t"
         f"{r['chart']}\t{r['app_version']}" for r in rows]))


def helm_upgrade(state: State, verb: str, opts: dict[str, Any], pos: list[str],
                 changed: set[str], keys: list[str]) -> None:
    """``helm upgrade [--install]`` and ``helm install`` (cmd/helm/upgrade.go, pkg/action)."""
    if verb == "install" and len(pos) == 1:
        if not opts.get("generate-name"):
            raise helm_error("INSTALLATION FAILED: must either provide a name or specify "
                             "--generate-name")
        pos = [f"{chart_basename(pos[0])}-{int(time.time())}", pos[0]]
    release, chart_ref = pos
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*",
                        release) or len(release) > 53:
        raise helm_error(f'release name "{release}": invalid release name, must match regex '
                         "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$ "
                         "and the length must not be longer than 53")
    hctx = HelmCtx(opts)
    ns = hctx.namespace
    key = f"{ns}/{release}"
    hctx.check_reachable()
    history = ((helm_releases(state).get(hctx.context) or {}).get(key) or {}).get("history") or []
    last = history[-1] if history else None
    installing = last is None or last["status"] == "uninstalled"
    if verb == "install":
        prefix = "INSTALLATION FAILED: "
        if not installing or (last is not None and not opts.get("replace")):
            raise helm_error(prefix + "cannot re-use a name that is still in use")
    elif installing and not opts.get("install"):
        raise helm_error(f'UPGRADE FAILED: "{release}" has no deployed releases')
    else:
        # upgrade --install: the install path returns its errors unwrapped (cmd/helm/upgrade.go)
        prefix = "" if installing else "UPGRADE FAILED: "
    if verb == "upgrade" and installing and opts["output"] == "table":
        out(f'Release "{release}" does not exist. Installing it now.')
    if not installing and last["status"].startswith("pending-"):
        raise helm_error(prefix + "another operation (install/upgrade/rollback) is in progress")
    # locate the chart like helm does: local path, oci://, URL, or repo/chart (repo must exist)
    if not (chart_ref.startswith(("oci://", "http://", "https://", "/", "./", "../"))
            or os.path.exists(chart_ref) or opts.get("repo")):
        if "/" in chart_ref:
            repo = chart_ref.split("/", 1)[0]
            if repo not in (state.read("helm-repos.json", {}) or {}):
                raise helm_error(f"{prefix}repo {repo} not found")
        else:
            raise helm_error(f"{prefix}non-absolute URLs should be in form of "
                             f"repo_name/path_to_chart, got: {chart_ref}")
    if chart_ref.startswith(("/", "./", "../")) and not os.path.exists(chart_ref):
        raise helm_error(f'{prefix}path "{chart_ref}" not found')
    vals = helm_merge_values(opts)
    meta = chart_meta(state, chart_ref, opts.get("version"))
    if not opts.get("version") and last is not None and last.get("chart") == meta["name"] \
            and meta.get("defaulted"):
        # no --version and nothing says what "latest" is: keep the version already installed
        meta["version"], meta["appVersion"] = last["version"], last.get("app_version", "")
    dry = opts.get("dry-run") not in (None, "none", "false")
    fail = injected_failure(state, keys)
    sleep_s = injected_sleep(state, keys)
    now = time.time()
    with state.locked():
        allrels = helm_releases(state)
        rels = allrels.setdefault(hctx.context, {})
        rec = rels.get(key)
        history = (rec or {}).get("history") or []
        last = history[-1] if history else None
        if last is not None and last["status"].startswith("pending-"):  # lost a race
            raise helm_error(prefix + "another operation (install/upgrade/rollback) is in "
                             "progress")
        if not installing:
            deployed = next((h for h in reversed(history) if h["status"] == "deployed"), None)
            current = deployed or (last if last and last["status"] in ("failed", "superseded")
                                   else None)
            if current is None:
                raise helm_error(f'{prefix}"{release}" has no deployed releases')
            old = current.get("values") or {}
            if opts.get("reset-values"):
                pass
            elif opts.get("reuse-values") or opts.get("reset-then-reuse-values"):
                vals = deep_merge(old, vals)
            elif not vals and old:
                vals = copy.deepcopy(old)
        revision = (last["revision"] + 1) if last else 1
        rev = {"revision": revision,
               "status": "pending-install" if installing else "pending-upgrade",
               "chart": meta["name"], "chart_ref": chart_ref, "version": meta["version"],
               "app_version": meta["appVersion"], "values": vals,
               "first_deployed": (history[0]["first_deployed"] if history and not installing
                                  else now),
               "last_deployed": now,
               "description": "Initial install underway" if installing else "Preparing upgrade",
               "namespace": ns, "wait": bool(opts.get("wait")), "timeout": opts.get("timeout"),
               "atomic": bool(opts.get("atomic")),
               "create_namespace": bool(opts.get("create-namespace")),
               "kubeconfig": hctx.kubeconfig, "flags": sorted(changed)}
        if dry:
            view = release_view({"name": release, "namespace": ns, "history": [rev]})
            view["info"]["description"] = "Dry run complete"
            helm_output(opts["output"], view, lambda: helm_status_table(view))
            return
        if rec is None:
            rec = {"name": release, "namespace": ns, "context": hctx.context, "history": []}
        rec["history"].append(rev)
        _sync_top(rec)
        rels[key] = rec
        state.write("helm.json", allrels)
    do_sleep(sleep_s)
    error: str | None = None
    code = 1
    if fail is not None:
        reason = "context deadline exceeded" if opts.get("wait") else \
            f"failed to create resource: Internal error occurred: injected failure ({fail['key']})"
        error = fail.get("stderr") or f"Error: {prefix}{reason}"
        code = int(fail.get("code") or 1)
    else:
        objs = chart_objects(state, meta["name"], release, ns)
        if objs is not None:
            try:
                apply_chart(hctx, objs, release, ns, bool(opts.get("create-namespace")))
            except ApplyError as e:
                error = f"Error: {prefix}{e}"
    with state.locked():
        allrels = helm_releases(state)
        rels = allrels.setdefault(hctx.context, {})
        rec = rels.get(key)
        if rec is None:  # uninstalled under our feet
            raise helm_error(f"{prefix}release: not found")
        cur = next(h for h in rec["history"] if h["revision"] == revision)
        if error is None:
            for h in rec["history"]:
                if h is not cur and h["status"] == "deployed":
                    h["status"] = "superseded"
            cur["status"] = "deployed"
            cur["description"] = "Install complete" if installing else "Upgrade complete"
        else:
            reason = error[len("Error: " + prefix):] if error.startswith("Error: " + prefix) \
                else error
            cur["status"] = "failed"
            cur["description"] = (f'Release "{release}" failed: {reason}' if installing
                                  else f'Upgrade "{release}" failed: {reason}')
            if opts.get("atomic"):
                if installing:
                    del rels[key]
                    error = (f"Error: {prefix}release {release} failed, and has been "
                             f"uninstalled due to atomic being set: {reason}")
                else:
                    good = next((h for h in reversed(rec["history"][:-1])
                                 if h["status"] in ("deployed", "superseded")), None)
                    if good is not None:
                        for h in rec["history"]:
                            if h["status"] == "deployed":
                                h["status"] = "superseded"
                        rb = dict(copy.deepcopy(good), revision=revision + 1, status="deployed",
                                  last_deployed=time.time(),
                                  description=f"Rollback to {good['revision']}")
                        rec["history"].append(rb)
                    error = (f"Error: {prefix}release {release} failed, and has been rolled "
                             f"back due to atomic being set: {reason}")
        if key in rels:
            _sync_top(rec)
        state.write("helm.json", allrels)
    if error is not None:
        raise Exit(code, error)
    if not installing and opts["output"] == "table":
        out(f'Release "{release}" has been upgraded. Happy Helming!')
    view = release_view(rec, cur)
    helm_output(opts["output"], view, lambda: helm_status_table(view))


def helm_uninstall(state: State, opts: dict[str, Any], pos: list[str]) -> None:
    hctx = HelmCtx(opts)
    hctx.check_reachable()
    for release in pos:
        key = f"{hctx.namespace}/{release}"
        with state.locked():
            allrels = helm_releases(state)
            rels = allrels.get(hctx.context, {})
            rec = rels.get(key)
            if rec is None or (rec["history"][-1]["status"] == "uninstalled"):
                if opts.get("ignore-not-found"):
                    continue
                if rec is not None:
                    raise helm_error(f'the release named "{release}" is already deleted')
                raise helm_error(f"uninstall: Release not loaded: {release}: release: not found")
            last = rec["history"][-1]
            if opts.get("dry-run"):
                out(f'release "{release}" uninstalled')
                continue
            if opts.get("keep-history"):
                last["status"] = "uninstalled"
                last["description"] = "Uninstallation complete"
                _sync_top(rec)
            else:
                del rels[key]
            state.write("helm.json", allrels)
        objs = chart_objects(state, last["chart"], release, hctx.namespace)
        if objs:
            delete_chart(hctx, objs, hctx.namespace)
        out(f'release "{release}" uninstalled')


def helm_rollback(state: State, opts: dict[str, Any], pos: list[str]) -> None:
    hctx = HelmCtx(opts)
    hctx.check_reachable()
    release = pos[0]
    target = 0
    if len(pos) > 1:
        try:
            target = int(pos[1])
        except ValueError:
            raise helm_error(f'strconv.Atoi: parsing "{pos[1]}": invalid syntax') from None
    key = f"{hctx.namespace}/{release}"
    with state.locked():
        allrels = helm_releases(state)
        rels = allrels.get(hctx.context, {})
        rec = rels.get(key)
        if rec is None:
            raise helm_error("release: not found")
        last = rec["history"][-1]
        prev = target or last["revision"] - 1
        src = next((h for h in rec["history"] if h["revision"] == prev), None)
        if src is None:
            raise helm_error(f"release has no {prev} version")
        if opts.get("dry-run"):
            out("Rollback was a success! Happy Helming!")
            return
        for h in rec["history"]:
            if h["status"] in ("deployed", "pending-install", "pending-upgrade",
                               "pending-rollback"):
                h["status"] = "superseded"
        now = time.time()
        new = dict(copy.deepcopy(src), revision=last["revision"] + 1, status="deployed",
                   last_deployed=now, description=f"Rollback to {prev}")
        rec["history"].append(new)
        _sync_top(rec)
        state.write("helm.json", allrels)
    out("Rollback was a success! Happy Helming!")


# ================================================================================================
# helpers for tests
# ================================================================================================


NATIVE_BIN_ENV = "LAB_FAKE_NATIVE_BIN"  # the C launchers' folder, where the session built them


def fakes_path(path: str) -> str:
    """``path`` with the fakes first: their C launchers where the test session built them
    (warmfakes.py), tests/fakes/bin, then the running interpreter's folder."""
    native = os.environ.get(NATIVE_BIN_ENV)
    return os.pathsep.join([*([native] if native else []), BIN_DIR,
                            os.path.dirname(sys.executable), path])


def fake_env(state_dir: str, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment that runs the fakes: PATH with tests/fakes/bin first, LAB_FAKE_STATE set.

    The running interpreter's directory comes second so ``#!/usr/bin/env python3`` finds a real
    python3 rather than a slow version-manager shim (pyenv adds ~80 ms per call).
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = fakes_path(env.get("PATH", ""))
    env[STATE_ENV] = str(state_dir)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def wait_until_sleeping(state_dir: str | os.PathLike[str], tool: str, words: list[str],
                        timeout: float = 30) -> dict[str, Any]:
    """Test side: poll (bounded) until a fake ``tool`` whose argv holds ``words`` is inside its
    injected sleep (``LAB_FAKE_SLEEP``); returns that call. Replaces sleeping in the test."""
    path = os.path.join(str(state_dir), SLEEPING)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError), open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break  # still being written
                call = json.loads(line)
                if call["tool"] == tool and all(w in call["argv"] for w in words):
                    return dict(call)
        time.sleep(0.02)
    raise AssertionError(f"no fake {tool} {words} reached its injected sleep in {timeout}s")


def read_calls(state_dir: str) -> list[dict[str, Any]]:
    p = os.path.join(str(state_dir), "calls.jsonl")
    if not os.path.exists(p):
        return []
    with open(p, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_intervals(state_dir: str) -> list[dict[str, Any]]:
    """Every finished call with its ``start`` and ``end`` time (calls.jsonl + ends.jsonl)."""
    p = os.path.join(str(state_dir), "ends.jsonl")
    ends: dict[int, float] = {}
    if os.path.exists(p):
        with open(p, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    e = json.loads(line)
                    ends[int(e["pid"])] = float(e["time"])
    return [dict(c, start=c["time"], end=ends[c["pid"]]) for c in read_calls(state_dir)
            if c["pid"] in ends]


def read_state(state_dir: str, name: str, default: Any = None) -> Any:
    return State(str(state_dir)).read(name, default)


def write_state(state_dir: str, name: str, data: Any) -> None:
    st = State(str(state_dir))
    with st.locked():
        st.write(name, data)
