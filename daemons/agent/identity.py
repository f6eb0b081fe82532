"""Who the agent is: its HTCondor job identity and the address it is reachable on.

The job identity is a *claim* the agent sends in ``hello``; the reconciler verifies it against
HTCondor and Kubernetes. It is read from the job ad HTCondor writes into the job's scratch
directory and points to with ``$_CONDOR_JOB_AD``. That file is in the "old" ClassAd syntax, one
``Attr = expression`` per line, so it is parsed with the real ClassAd library (``classad2``)
rather than by splitting strings: values are ClassAd expressions (quoted strings with escapes,
integers, lists, even references to other attributes) and only the library evaluates them right.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import classad2
import structlog

log = structlog.get_logger(__name__)

JOB_AD_ENV = "_CONDOR_JOB_AD"

# The old-syntax parser takes anything before '=' as the name ("[ ClusterId" included).
_ATTR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class JobIdentity:
    """The HTCondor job this agent runs in, as the schedd knows it."""

    global_job_id: str
    cluster_id: int
    proc_id: int
    owner: str | None
    schedd: str


class JobAdError(Exception):
    """The job ad file cannot be turned into a JobIdentity; the message names file and cause."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"job ad {path}: {problem}")
        self.path = path
        self.problem = problem


def _parse_old_ad(path: Path, text: str) -> classad2.ClassAd:
    """Parse old-syntax text line by line.

    The classad2 parser silently stops at the first line it cannot parse and returns what it
    has so far (verified with htcondor 25.x), which would turn a truncated or corrupt file into a
    plausible-looking partial ad. Parsing each line on its own makes every bad line an error
    that names its line number. (Trailing junk after a complete value, "X = 1 junk", is still
    accepted: the ClassAd library itself ignores it, as HTCondor does when it reads the file.)
    """
    ad = classad2.ClassAd()
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            one = classad2.parseOne(line, classad2.ParserType.Old)
        except Exception as exc:  # the binding raises its own, undocumented types
            raise JobAdError(path, f"line {lineno} is not a ClassAd attribute: {exc}") from exc
        if len(one) != 1 or not _ATTR_NAME.fullmatch(next(iter(one))):
            shown = line if len(line) <= 80 else line[:77] + "..."
            raise JobAdError(path, f"line {lineno} is not a ClassAd attribute: {shown!r}")
        ad.update(one)
    if len(ad) == 0:
        raise JobAdError(path, "not a ClassAd (no attributes)")
    return ad


def _evaluate(path: Path, ad: classad2.ClassAd, attr: str) -> Any:
    try:
        value = ad.eval(attr)
    except KeyError:
        raise JobAdError(path, f"missing attribute {attr}") from None
    if isinstance(value, classad2.Value):  # Undefined or Error
        raise JobAdError(path, f"attribute {attr} evaluates to {value.name.lower()}")
    return value


def _int_attr(path: Path, ad: classad2.ClassAd, attr: str) -> int:
    value = _evaluate(path, ad, attr)
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobAdError(path, f"attribute {attr} is not an integer: {value!r}")
    return value


def _str_attr(path: Path, ad: classad2.ClassAd, attr: str) -> str:
    value = _evaluate(path, ad, attr)
    if not isinstance(value, str) or not value:
        raise JobAdError(path, f"attribute {attr} is not a non-empty string: {value!r}")
    return value


def schedd_of(global_job_id: str) -> str:
    """The schedd name inside a GlobalJobId ("schedd.example.org#1234.0#1700000000").

    Raises ValueError when there is no schedd part, so callers never route by an empty name.
    """
    schedd, sep, rest = global_job_id.partition("#")
    if not sep or not schedd or not rest:
        raise ValueError(
            f"GlobalJobId {global_job_id!r} is not of the form schedd#cluster.proc#time"
        )
    return schedd


def read_job_ad(path: Path) -> JobIdentity:
    """Read the job identity from an HTCondor job ad file (``$_CONDOR_JOB_AD``)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise JobAdError(path, "unreadable: no such file") from None
    except PermissionError:
        raise JobAdError(path, "unreadable: permission denied") from None
    except IsADirectoryError:
        raise JobAdError(path, "unreadable: is a directory") from None
    except OSError as exc:
        raise JobAdError(path, f"unreadable: {exc.strerror or exc}") from exc
    if b"\0" in data:
        raise JobAdError(path, "not a ClassAd (binary content)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JobAdError(path, f"not a ClassAd (not UTF-8 text: {exc.reason})") from None

    ad = _parse_old_ad(path, text)
    global_job_id = _str_attr(path, ad, "GlobalJobId")
    try:
        schedd = schedd_of(global_job_id)
    except ValueError as exc:
        raise JobAdError(path, str(exc)) from None
    owner: str | None = None
    if "Owner" in ad:
        value = ad.eval("Owner")
        owner = value if isinstance(value, str) and value else None
    return JobIdentity(
        global_job_id=global_job_id,
        cluster_id=_int_attr(path, ad, "ClusterId"),
        proc_id=_int_attr(path, ad, "ProcId"),
        owner=owner,
        schedd=schedd,
    )


def job_identity_from_environment(environ: Mapping[str, str]) -> JobIdentity | None:
    """The job identity if HTCondor told us where the job ad is, else None.

    Never raises: an agent started by hand (or through plain ``ssh -R``-style use) has no job ad
    and must still work; it just announces no job, and the reconciler won't route workers to it.
    """
    value = environ.get(JOB_AD_ENV)
    if not value:
        log.info("no job ad", env=JOB_AD_ENV, reason=f"{JOB_AD_ENV} is not set")
        return None
    path = Path(value)
    try:
        return read_job_ad(path)
    except JobAdError as exc:
        log.warning("job ad unreadable", path=str(path), error=exc.problem)
        return None


def detect_private_ip(host: str, port: int) -> str:
    """The local address the kernel would use to reach ``host:port``.

    That is the address workers in the same private network can reach this job on. A UDP
    socket's ``connect`` only selects a route and a source address: no packet is sent, so this
    works even where the forwarder is unreachable by UDP. Every resolved address is tried in
    getaddrinfo order (IPv6 first where the resolver prefers it), the first routable one wins.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve forwarder host {host!r}: {exc.strerror}") from exc
    errors: list[str] = []
    for family, socktype, proto, _canon, sockaddr in infos:
        with socket.socket(family, socktype, proto) as sock:
            try:
                sock.connect(sockaddr)
            except OSError as exc:
                errors.append(f"{sockaddr[0]}: {exc.strerror or exc}")
                continue
            # A scoped IPv6 link-local source comes back as "fe80::1%eth0"; keep it whole.
            address: str = sock.getsockname()[0]
            return address
    detail = "; ".join(errors) if errors else "no address"
    raise OSError(f"no route to forwarder {host}:{port} ({detail})")
