"""ModSecurity v3 with the OWASP Core Rule Set, in-process: the rule-based baseline for the guard.

The engine is PyPI's ``libmodsecurity`` (a manylinux wheel that bundles libmodsecurity 3.0.15 and
the libraries it needs); the rules are Debian's ``modsecurity-crs`` (CRS 3.3.4) as installed under
``/usr/share/modsecurity-crs``. Neither is a WebTorch dependency: :func:`unavailable` says why this
machine can't build a :class:`CRS`, and the constructor raises :class:`CRSUnavailable` with the
same reason. README.md beside this file has the install commands and what was changed in the rules.

CRS runs in anomaly-scoring mode, as shipped: every matching rule adds to the request's inbound
anomaly score (critical 5, error 4, warning 3, notice 2) and rule 949110 denies with 403 once the
score reaches the threshold (5 by default, so one critical match blocks). Only the request rules
are loaded; the guard sees requests, not responses.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, cast

from webtorch.errors import WebTorchError

CRS_DIR = Path("/usr/share/modsecurity-crs")

# Rules the bundled engine can't compile, with the reason; they are cut out of their file before
# it is loaded. 910100 only acts once tx.high_risk_country_codes is set, which the shipped setup
# leaves empty, so dropping it changes no verdict.
UNSUPPORTED_RULES: dict[int, str] = {
    910100: "uses @geoLookup; the wheel's libmodsecurity is built without GeoIP/MaxMind",
}

# Our own rule (ids below 100000 are for local use; CRS owns 900000-999999). It runs in phase 2
# just before CRS's blocking evaluation and logs the per-paranoia-level scores, so the score is
# known for passed requests too, not only for the ones 949110 blocks.
_SCORE_RULE_ID = 99001
_SCORE_RULE = (
    f"SecAction \"id:{_SCORE_RULE_ID},phase:2,pass,t:none,log,msg:'webtorch anomaly score',"
    "logdata:'%{tx.anomaly_score_pl1} %{tx.anomaly_score_pl2} "
    "%{tx.anomaly_score_pl3} %{tx.anomaly_score_pl4}'\""
)

# After ModSecurity v3's modsecurity.conf-recommended, in blocking mode and with the audit log and
# response inspection off (the guard inspects requests only; nothing is written to disk).
_ENGINE_CONFIG = r"""
SecRuleEngine On
SecRequestBodyAccess On
SecRule REQUEST_HEADERS:Content-Type "^(?:application(?:/soap\+|/)|text/)xml" \
    "id:200000,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=XML"
SecRule REQUEST_HEADERS:Content-Type "^application/json" \
    "id:200001,phase:1,t:none,t:lowercase,pass,nolog,ctl:requestBodyProcessor=JSON"
SecRequestBodyLimit 13107200
SecRequestBodyNoFilesLimit 131072
SecRequestBodyLimitAction Reject
SecRequestBodyJsonDepthLimit 512
SecArgumentsLimit 1000
SecRule &ARGS "@ge 1000" \
    "id:200007,phase:2,t:none,log,deny,status:400,msg:'Too many arguments',severity:2"
SecRule REQBODY_ERROR "!@eq 0" \
    "id:200002,phase:2,t:none,log,deny,status:400,msg:'Failed to parse request body.',\
logdata:'%{reqbody_error_msg}',severity:2"
SecRule MULTIPART_STRICT_ERROR "!@eq 0" \
    "id:200003,phase:2,t:none,log,deny,status:400,\
msg:'Multipart request body failed strict validation'"
SecRule MULTIPART_UNMATCHED_BOUNDARY "@eq 1" \
    "id:200004,phase:2,t:none,log,deny,\
msg:'Multipart parser detected a possible unmatched boundary.'"
SecPcreMatchLimit 1000
SecPcreMatchLimitRecursion 1000
SecRule TX:/^MSC_/ "!@streq 0" \
    "id:200005,phase:2,t:none,deny,msg:'ModSecurity internal error flagged: %{MATCHED_VAR_NAME}'"
SecResponseBodyAccess Off
SecAuditEngine Off
SecArgumentSeparator &
SecCookieFormat 0
"""

# The active lines of the shipped crs-setup.conf (anomaly scoring: rules pass and add to the score;
# 949110 denies), with the settings this baseline varies uncommented (ids as in that file).
_SETUP_TEMPLATE = """
SecDefaultAction "phase:1,log,auditlog,pass"
SecDefaultAction "phase:2,log,auditlog,pass"
SecCollectionTimeout 600
SecAction "id:900000,phase:1,nolog,pass,t:none,setvar:tx.paranoia_level={paranoia}"
SecAction "id:900001,phase:1,nolog,pass,t:none,setvar:tx.executing_paranoia_level={paranoia}"
SecAction "id:900110,phase:1,nolog,pass,t:none,\\
setvar:tx.inbound_anomaly_score_threshold={threshold},\\
setvar:tx.outbound_anomaly_score_threshold=4"
SecAction "id:900990,phase:1,nolog,pass,t:none,setvar:tx.crs_setup_version=334"
"""


class CRSUnavailable(WebTorchError):
    """The ModSecurity binding or the CRS rules are missing or unusable; the message says which."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What ModSecurity decided about one request.

    ``status`` is the status it would answer with when it blocks (403 for CRS's anomaly block,
    400 for an unparseable body, 413 for one over the limit). ``anomaly_score`` is CRS's inbound
    score at the configured paranoia level, or None when the request was stopped before phase 2
    scoring finished. ``rule_ids`` are the rules that matched, in the order they fired.
    """

    blocked: bool
    status: int | None
    anomaly_score: int | None
    rule_ids: tuple[int, ...]


class _RuleMessage(Protocol):
    @property
    def rule_id(self) -> int: ...
    @property
    def data(self) -> str: ...


class _Intervention(Protocol):
    @property
    def status(self) -> int: ...
    @property
    def disruptive(self) -> bool: ...


class _Transaction(Protocol):
    def process_connection(
        self, client_ip: str, client_port: int, server_ip: str, server_port: int
    ) -> int: ...
    def process_uri(self, uri: str | bytes, method: str, http_version: str) -> int: ...
    def add_request_header(self, name: str | bytes, value: str | bytes) -> int: ...
    def process_request_headers(self) -> int: ...
    def append_request_body(self, body: bytes) -> int: ...
    def process_request_body(self) -> int: ...
    def process_logging(self) -> int: ...
    def intervention(self) -> _Intervention | None: ...
    def get_rule_messages(self) -> list[_RuleMessage]: ...


class _RulesSet(Protocol):
    def load(self, plain_rules: str) -> int: ...
    def load_from_uri(self, uri: str) -> int: ...
    def get_parser_error(self) -> str: ...


class _Engine(Protocol):
    def set_log_callback(self, callback: Callable[[str], None] | None) -> None: ...


class _Binding(Protocol):
    """The part of the ``libmodsecurity`` module used here (imported by name, so that mypy and
    the import of this module work where it isn't installed)."""

    def ModSecurity(self) -> _Engine: ...
    def RulesSet(self) -> _RulesSet: ...
    def Transaction(self, modsecurity: _Engine, rules: _RulesSet) -> _Transaction: ...


def unavailable(crs_dir: Path = CRS_DIR) -> str | None:
    """Why a :class:`CRS` can't be built on this machine, or None when it can."""
    if importlib.util.find_spec("libmodsecurity") is None:
        return "the libmodsecurity binding is not installed (pip install libmodsecurity)"
    rules = crs_dir / "rules"
    if not (rules / "REQUEST-949-BLOCKING-EVALUATION.conf").is_file():
        return f"no OWASP CRS rules in {rules} (apt-get install modsecurity-crs)"
    version = crs_version(crs_dir)
    if version is None or not version.startswith("3."):
        return f"CRS {version or '(unknown version)'} in {crs_dir}; this wrapper is for CRS 3.x"
    return None


def crs_version(crs_dir: Path = CRS_DIR) -> str | None:
    """The CRS version the rules in ``crs_dir`` declare ("3.3.4"), or None."""
    try:
        text = (crs_dir / "rules" / "REQUEST-901-INITIALIZATION.conf").read_text()
    except OSError:
        return None
    found = re.search(r"ver:'OWASP_CRS/([0-9.]+)'", text)
    return found.group(1) if found else None


class CRS:
    """ModSecurity + OWASP CRS at one paranoia level, inspecting one request at a time.

    Loading the rules takes tens of milliseconds; build one and reuse it. ``setup`` is SecLanguage
    loaded after the CRS setup and before the rules (site settings such as ``tx.allowed_methods``);
    ``exclusions`` is loaded after the rules (``SecRuleRemoveById`` and the like).
    """

    def __init__(
        self,
        paranoia: int = 1,
        threshold: int = 5,
        *,
        crs_dir: Path = CRS_DIR,
        setup: str = "",
        exclusions: str = "",
    ) -> None:
        if paranoia not in (1, 2, 3, 4):
            raise ValueError(f"CRS paranoia level must be 1..4, not {paranoia}")
        if threshold < 1:
            raise ValueError(f"anomaly threshold must be at least 1, not {threshold}")
        reason = unavailable(crs_dir)
        if reason is not None:
            raise CRSUnavailable(reason)
        self.paranoia = paranoia
        self.threshold = threshold
        binding = cast(_Binding, importlib.import_module("libmodsecurity"))
        self._binding = binding
        self._engine = binding.ModSecurity()
        # Matches are read from the transaction; without a callback the engine prints every one
        # to stderr. The binding keeps the callback in a registry until it is unset.
        self._engine.set_log_callback(_discard)
        self._finalizer = weakref.finalize(self, self._engine.set_log_callback, None)
        self._rules = binding.RulesSet()
        # One load: when separate loads set the same engine directive (a body limit, say), the
        # first one wins, so ``setup`` could not override the defaults.
        crs_setup = _SETUP_TEMPLATE.format(paranoia=paranoia, threshold=threshold)
        count = self._load("configuration and setup", "\n".join((_ENGINE_CONFIG, crs_setup, setup)))
        self.rule_files: list[Path] = []
        for path in sorted((crs_dir / "rules").glob("REQUEST-*.conf")):
            if path.name.startswith("REQUEST-949-"):
                count += self._load("score rule", _SCORE_RULE)
            count += self._load_file(path)
            self.rule_files.append(path)
        if exclusions:
            self._load("exclusions", exclusions)
        # Rules (and SecActions) loaded, chains counted once; exclusions not subtracted.
        self.rule_count = count

    def close(self) -> None:
        """Unregister the engine's log callback (also done when the CRS is collected)."""
        self._finalizer()

    def _load(self, what: str, text: str) -> int:
        count = self._rules.load(text)
        if count < 0:
            error = self._rules.get_parser_error()
            raise CRSUnavailable(f"ModSecurity rejected the {what}: {error}")
        return count

    def _load_file(self, path: Path) -> int:
        text = path.read_text()
        cut = [rule_id for rule_id in UNSUPPORTED_RULES if f"id:{rule_id}," in text]
        if cut:
            # A string load resolves @pmFromFile paths against the working directory, not the
            # file's; the files with unsupported rules have no @pmFromFile, which is checked.
            text = _without_rules(text, cut)
            if re.search(r"^[^#\n]*FromFile", text, re.MULTILINE):
                raise CRSUnavailable(f"{path}: can't cut rules {cut} from a file that reads data")
            return self._load(str(path), text)
        count = self._rules.load_from_uri(str(path))
        if count < 0:
            raise CRSUnavailable(f"ModSecurity rejected {path}: {self._rules.get_parser_error()}")
        return count

    def inspect(
        self,
        method: str,
        target: str | bytes,
        headers: Iterable[tuple[str | bytes, str | bytes]],
        body: bytes = b"",
        client_ip: str = "127.0.0.1",
        http_version: str = "1.1",
    ) -> Verdict:
        """Run one request through phases 1 and 2 (connection, URI, headers, body).

        ``target`` is the request target as sent (path and query, still percent-encoded);
        ``headers`` are name/value pairs as received, bytes or str. Stops at the first
        disruptive intervention, as a server connector would.
        """
        tx = self._binding.Transaction(self._engine, self._rules)
        try:
            tx.process_connection(client_ip, 0, "127.0.0.1", 80)
            tx.process_uri(target, method, http_version)
            stop = tx.intervention()
            if stop is None or not stop.disruptive:
                for name, value in headers:
                    tx.add_request_header(name, value)
                tx.process_request_headers()
                stop = tx.intervention()
            if stop is None or not stop.disruptive:
                if body:
                    tx.append_request_body(body)
                    stop = tx.intervention()
                if stop is None or not stop.disruptive:
                    tx.process_request_body()
                    stop = tx.intervention()
            messages = tx.get_rule_messages()
        finally:
            tx.process_logging()
        score: int | None = None
        fired: list[int] = []
        for message in messages:
            if message.rule_id == _SCORE_RULE_ID:
                score = _score(message.data, self.paranoia)
            elif message.rule_id not in fired:
                fired.append(message.rule_id)
        blocked = stop is not None and stop.disruptive
        return Verdict(
            blocked=blocked,
            status=stop.status if blocked and stop is not None else None,
            anomaly_score=score,
            rule_ids=tuple(fired),
        )


def _discard(line: str) -> None:
    pass


def _score(data: str, paranoia: int) -> int | None:
    """Sum the per-level scores the score rule logged, up to ``paranoia`` (as 949060-949063 do)."""
    try:
        return sum(int(part) for part in data.split()[:paranoia])
    except ValueError:
        return None


def _without_rules(text: str, rule_ids: Iterable[int]) -> str:
    """``text`` less the rules (with their chains and comments) that declare ``rule_ids``.

    CRS separates rules by blank lines and never puts one inside a rule or chain.
    """
    marks = tuple(f"id:{rule_id}," for rule_id in rule_ids)
    blocks = re.split(r"\n[ \t]*\n", text)
    return "\n\n".join(block for block in blocks if not any(mark in block for mark in marks))
