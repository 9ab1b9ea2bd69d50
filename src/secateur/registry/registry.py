"""The :class:`Registry`: families of variants, their lineage, evaluations, pipeline runs and
movable aliases, in one SQLite database beside a content-addressed artifact store.

    reg = Registry()                                   # the home folder (SECATEUR_HOME), or Registry(path)
    v = reg.add("out/llama-50", family="stories")      # copy into the store, record card + lineage
    reg.record_evaluation(v.id, result)                # an EvalResult (or its dict)
    reg.set_alias("stories", "fast", v.id)             # stories@fast -> v
    reg.rollback("stories", "fast")                    # back to the previous target
    reg.resolve("stories@fast").path                   # the stored artifact

A ref is ``family@alias``, a variant id (``v-<12 hex>``) or ``family/name``. Every write is one
transaction (:mod:`.db`), so a reader never sees a variant without its lineage edge, and a writer
killed midway leaves nothing of its work.
"""

from __future__ import annotations

import json
import logging
import math
import re
import secrets
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from ..errors import did_you_mean, one_of
from . import store
from .db import DB_NAME, Database, RegistryError
from .rows import Alias, AliasMove, Compared, Evaluation, GcReport, LineageNode, Run, Variant

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
VARIANT_ID = re.compile(r"^v-[0-9a-f]{12}$")
RUN_ID = re.compile(r"^r-[0-9a-f]{12}$")
STATUSES = ("admitted", "rejected")
RUN_STATUSES = ("running", "succeeded", "failed", "interrupted")

_VARIANT_SELECT = """SELECT v.id, f.name, v.name, v.status, v.weights_sha256, v.bytes, v.parameters, v.model_type,
                            v.store_key, v.created, v.card, v.info, v.run_id, e.parent_id
                     FROM variants v JOIN families f ON f.id = v.family_id
                     LEFT JOIN edges e ON e.child_id = v.id"""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _clean(value: Any) -> Any:
    """Strict JSON: non-finite floats as null, tuples as lists, anything else unknown as its str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item"):
        return _clean(value.item())
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(_clean(value), sort_keys=True, allow_nan=False)


def _loads(text: Optional[str], default: Any = None) -> Any:
    return default if text is None else json.loads(text)


def check_name(kind: str, value: Any) -> str:
    """A family, variant or alias name: letters, digits, ``.``, ``_``, ``-`` (no ``@`` or ``/``)."""
    if not isinstance(value, str) or not NAME.match(value):
        raise RegistryError(f"{kind} name {value!r} is not valid: use letters, digits, '.', '_' and '-' "
                            "(starting with a letter or digit, at most 100 characters)")
    if VARIANT_ID.match(value):
        raise RegistryError(f"{kind} name {value!r} looks like a variant id; choose another name")
    return value


def parse_ref(ref: str) -> tuple[str, ...]:
    """``("id", id)``, ``("alias", family, alias)`` or ``("name", family, name)``; an error
    naming the three forms otherwise."""
    text = str(ref)
    if VARIANT_ID.match(text):
        return ("id", text)
    for sep, kind in (("@", "alias"), ("/", "name")):
        if text.count(sep) == 1 and text.count("@") + text.count("/") == 1:
            family, name = text.split(sep)
            if NAME.match(family) and NAME.match(name):
                return (kind, family, name)
    raise RegistryError(f"{ref!r} is not a registry ref; expected FAMILY@ALIAS, FAMILY/NAME or a variant id "
                        "(v- and 12 hex digits)")


def looks_like_ref(text: str) -> bool:
    try:
        parse_ref(text)
    except RegistryError:
        return False
    return True


class Registry:
    """The registry in ``home`` (default: the ``SECATEUR_HOME`` setting): ``registry.db`` and
    ``objects/``. Open one per process (or thread group); close it, or use it as a context manager."""

    def __init__(self, home: Union[str, Path, None] = None, *, mlflow_uri: Optional[str] = None):
        from ..settings import home as default_home, mlflow_uri as default_mlflow_uri

        self.home = Path(home).expanduser() if home is not None else default_home()
        try:
            self.home.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(f"cannot create the registry home {self.home}: {exc.strerror or exc}; set "
                                "SECATEUR_HOME to a writable folder") from None
        self.objects = self.home / store.OBJECTS
        self.db = Database(self.home / DB_NAME)
        self.mlflow_uri = mlflow_uri or default_mlflow_uri()
        self._mirror: Any = None

    def mirror(self) -> Any:
        """The :class:`~secateur.registry.mirror.MlflowMirror` of ``mlflow_uri`` (None without one)."""
        if self.mlflow_uri and self._mirror is None:
            from .mirror import MlflowMirror

            self._mirror = MlflowMirror(self.mlflow_uri)
        return self._mirror

    def _mirrored(self, what: str, action: Any) -> None:
        """Run ``action(mirror)`` when a mirror is set; a failure is a warning (the registry is the
        source of truth, and ``secateur registry mirror`` catches up)."""
        if not self.mlflow_uri:
            return
        try:
            action(self.mirror())
        except Exception as exc:  # noqa: BLE001 - the write itself succeeded
            log.warning("mlflow mirror (%s) failed: %s; run `secateur registry mirror` to catch up", what, exc)

    @classmethod
    def existing(cls, home: Union[str, Path, None] = None) -> Optional["Registry"]:
        """The registry in ``home`` if it has a database; None (nothing created) otherwise."""
        from ..settings import home as default_home

        root = Path(home).expanduser() if home is not None else default_home()
        return cls(root) if (root / DB_NAME).is_file() else None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Registry({str(self.home)!r})"

    # --- rows -----------------------------------------------------------------------------------

    def _variant(self, row: tuple) -> Variant:
        (vid, family, name, status, sha, size, params, model_type, key, created, card, info, run_id,
         parent_id) = row
        return Variant(vid, family, name, status, sha, int(size), params, model_type, key, self.objects / key,
                       created, _loads(card), _loads(info, {}), run_id, parent_id)

    @staticmethod
    def _evaluation(row: tuple) -> Evaluation:
        (eid, vid, task, metric, protocol, value, extra, settings, fingerprint, machine, run_id, at) = row
        return Evaluation(eid, vid, task, metric, protocol, value, _loads(extra, {}), _loads(settings, {}),
                          fingerprint, _loads(machine), run_id, at)

    @staticmethod
    def _run(row: tuple) -> Run:
        rid, pipeline, status, started, finished, timings, verdicts, info = row
        return Run(rid, pipeline, status, started, finished, _loads(timings, {}), _loads(verdicts, []),
                   _loads(info, {}))

    # --- looking things up (inside a transaction) -----------------------------------------------

    def _family_id(self, conn: sqlite3.Connection, family: str, create: bool = False) -> int:
        row = conn.execute("SELECT id FROM families WHERE name = ?", (family,)).fetchone()
        if row is not None:
            return row[0]
        if create:
            return conn.execute("INSERT INTO families (name, created) VALUES (?, ?)", (check_name("family", family),
                                                                                       _now())).lastrowid
        names = [r[0] for r in conn.execute("SELECT name FROM families ORDER BY name")]
        exists = f"families: {one_of(names)}" if names else "the registry has no families yet (add one with " \
                                                             "`secateur registry add DIR --family NAME`)"
        raise RegistryError(f"unknown family '{family}'{did_you_mean(family, names)} in registry {self.home}; "
                            f"{exists}")

    def _resolve(self, conn: sqlite3.Connection, ref: Union[str, Variant]) -> Variant:
        if isinstance(ref, Variant):
            ref = ref.id
        parsed = parse_ref(ref)
        if parsed[0] == "id":
            row = conn.execute(_VARIANT_SELECT + " WHERE v.id = ?", (parsed[1],)).fetchone()
            if row is None:
                ids = [r[0] for r in conn.execute("SELECT id FROM variants ORDER BY rowid DESC LIMIT 1000")]
                shown = f"{len(ids)} variants exist, e.g. {one_of(ids[:5])}" if ids else "it holds no variants"
                raise RegistryError(f"no variant '{ref}' in registry {self.home}{did_you_mean(ref, ids)}; {shown}")
            return self._variant(row)
        kind, family, name = parsed
        family_id = self._family_id(conn, family)
        if kind == "alias":
            row = conn.execute("SELECT variant_id FROM aliases WHERE family_id = ? AND name = ?",
                               (family_id, name)).fetchone()
            if row is None:
                names = [r[0] for r in conn.execute("SELECT name FROM aliases WHERE family_id = ? ORDER BY name",
                                                    (family_id,))]
                exists = f"its aliases: {one_of(names)}" if names else \
                    f"it has no aliases (set one with `secateur registry alias {family}@NAME REF`)"
                raise RegistryError(f"family '{family}' has no alias '{name}'{did_you_mean(name, names)}; {exists}")
            return self._resolve(conn, row[0])
        row = conn.execute(_VARIANT_SELECT + " WHERE v.family_id = ? AND v.name = ?", (family_id, name)).fetchone()
        if row is None:
            names = [r[0] for r in conn.execute("SELECT name FROM variants WHERE family_id = ? ORDER BY rowid",
                                                (family_id,))]
            exists = f"its variants: {one_of(names)}" if names else "it has no variants"
            raise RegistryError(f"family '{family}' has no variant named '{name}'{did_you_mean(name, names)}; "
                                f"{exists}")
        return self._variant(row)

    def resolve(self, ref: Union[str, Variant]) -> Variant:
        """The variant a ref names: ``family@alias``, a variant id, or ``family/name``."""
        return self.db.read(lambda c: self._resolve(c, ref))

    def path(self, ref: Union[str, Variant]) -> Path:
        """Where the variant's files are (a complete artifact directory; read it, never write it)."""
        return self.resolve(ref).path

    def families(self) -> list[str]:
        return self.db.read(lambda c: [r[0] for r in c.execute("SELECT name FROM families ORDER BY name")])

    def list(self, family: Optional[str] = None) -> list[Variant]:
        """Every variant (of ``family``), oldest first."""

        def body(conn: sqlite3.Connection) -> list[Variant]:
            if family is None:
                rows = conn.execute(_VARIANT_SELECT + " ORDER BY v.rowid").fetchall()
            else:
                rows = conn.execute(_VARIANT_SELECT + " WHERE v.family_id = ? ORDER BY v.rowid",
                                    (self._family_id(conn, family),)).fetchall()
            return [self._variant(r) for r in rows]

        return self.db.read(body)

    def aliases(self, family: Optional[str] = None) -> list[Alias]:
        def body(conn: sqlite3.Connection) -> list[Alias]:
            sql = "SELECT f.name, a.name, a.variant_id, a.updated FROM aliases a JOIN families f ON f.id = a.family_id"
            if family is None:
                rows = conn.execute(sql + " ORDER BY f.name, a.name").fetchall()
            else:
                rows = conn.execute(sql + " WHERE a.family_id = ? ORDER BY a.name",
                                    (self._family_id(conn, family),)).fetchall()
            return [Alias(*r) for r in rows]

        return self.db.read(body)

    def alias_history(self, family: str, alias: str) -> list[AliasMove]:
        """Every move of ``family@alias``, oldest first."""

        def body(conn: sqlite3.Connection) -> list[AliasMove]:
            rows = conn.execute("SELECT id, action, variant_id, previous_id, undone, at FROM alias_history "
                                "WHERE family_id = ? AND alias = ? ORDER BY id",
                                (self._family_id(conn, family), alias)).fetchall()
            return [AliasMove(r[0], family, alias, r[1], r[2], r[3], bool(r[4]), r[5]) for r in rows]

        return self.db.read(body)

    def evaluations(self, ref: Union[str, Variant]) -> list[Evaluation]:
        def body(conn: sqlite3.Connection) -> list[Evaluation]:
            variant = self._resolve(conn, ref)
            rows = conn.execute("SELECT id, variant_id, task, metric, protocol, value, extra, settings, "
                                "data_fingerprint, machine, run_id, at FROM evaluations WHERE variant_id = ? "
                                "ORDER BY id", (variant.id,)).fetchall()
            return [self._evaluation(r) for r in rows]

        return self.db.read(body)

    # --- adding variants -----------------------------------------------------------------------

    def add(self, artifact_dir: Union[str, Path], family: str, name: Optional[str] = None,
            parent: Union[str, Variant, None] = None, *, status: str = "admitted", run: Optional[str] = None,
            evidence: Optional[dict[str, Any]] = None) -> Variant:
        """Copy ``artifact_dir`` into the store (once per content) and record it as a variant of
        ``family`` (created on first use); return it.

        Any model directory works: a secateur artifact (verified against its card; its lineage
        becomes an edge from its parent: ``parent`` when given, else the registered variant whose
        weights the card's ``base_model`` names) or a plain Hugging Face / llm-compressor
        checkpoint (weights hash, bytes, parameters, model type and quantization format are
        recorded). ``name`` defaults to the directory's name. Adding the same content to the same
        family again returns the variant already there. ``status="rejected"`` (with ``evidence``,
        e.g. the gate verdicts) records a variant that failed its gates; it can get no alias.
        """
        check_name("family", family)
        source = Path(artifact_dir).expanduser().absolute()
        if name is None:
            name = re.sub(r"[^A-Za-z0-9._-]", "-", source.name).lstrip("._-") or "variant"
        check_name("variant", name)
        if status not in STATUSES:
            raise RegistryError(f"status {status!r} is not valid; valid: {one_of(STATUSES)}")
        if parent is not None:
            self.resolve(parent)  # an unknown parent fails before the copy
        staged = store.stage(source, self.objects)
        try:
            fields = self._fields(staged, source, evidence)
            vid = self.db.write(lambda conn: self._insert(conn, staged, fields, family, name, parent, status, run))
        finally:
            store.discard(staged)  # nothing left when it was installed
        variant = self.resolve(vid)
        self._mirrored("add", lambda m: m.variant(self, variant))
        return variant

    def _fields(self, staged: store.Staged, source: Path, evidence: Optional[dict[str, Any]]) -> dict[str, Any]:
        card, config = staged.card, staged.config
        quant = config.get("quantization_config") or {}
        info: dict[str, Any] = {
            "source": str(source), "files": len(staged.files),
            "weights_bytes": sum(e["bytes"] for p, e in staged.files.items() if p.endswith(".safetensors")),
            "config": {"model_type": config.get("model_type"), "architectures": config.get("architectures"),
                       "quantization": {k: quant.get(k) for k in ("quant_method", "format") if quant.get(k)}
                       if isinstance(quant, dict) else {}},
        }
        if evidence:
            info["evidence"] = evidence
        parameters = None
        model_type = config.get("model_type")
        if card is not None:
            parameters = (card.get("sparsity") or {}).get("parameters")
            model_type = (card.get("model") or {}).get("model_type") or model_type
        if parameters is None:
            parameters = store.safetensors_parameters(staged.tmp, staged.files)
        return {"card": card, "info": info, "parameters": parameters, "model_type": model_type}

    def _insert(self, conn: sqlite3.Connection, staged: store.Staged, fields: dict[str, Any], family: str, name: str,
                parent: Union[str, Variant, None], status: str, run: Optional[str]) -> str:
        family_id = self._family_id(conn, family, create=True)
        same = conn.execute("SELECT id, name FROM variants WHERE family_id = ? AND store_key = ?",
                            (family_id, staged.key)).fetchone()
        if same is not None:
            log.info("%s is already registered in family %s as %s (%s)", staged.tmp, family, same[1], same[0])
            return same[0]
        taken = conn.execute("SELECT id FROM variants WHERE family_id = ? AND name = ?", (family_id, name)).fetchone()
        if taken is not None:
            raise RegistryError(f"family '{family}' already has a variant named '{name}' ({taken[0]}) with other "
                                "content; choose another name (--name)")
        parent_variant = self._resolve(conn, parent) if parent is not None else None
        if run is not None:
            self._run_row(conn, run)
        installed = store.install(staged, self.objects)
        try:
            vid = f"v-{secrets.token_hex(6)}"
            conn.execute("INSERT INTO variants (id, family_id, name, status, card, info, weights_sha256, bytes, "
                         "parameters, model_type, store_key, run_id, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         (vid, family_id, name, status, None if fields["card"] is None else _dumps(fields["card"]),
                          _dumps(fields["info"]), staged.weights_sha256, staged.bytes, fields["parameters"],
                          fields["model_type"], staged.key, run, _now()))
            self._link(conn, vid, staged, fields["card"], parent_variant)
        except BaseException:
            if installed:  # nothing committed references it: take it back out of the store
                store.delete(store.trash(self.objects, [staged.key]))
            raise
        return vid

    def _link(self, conn: sqlite3.Connection, vid: str, staged: store.Staged, card: Optional[dict[str, Any]],
              parent: Optional[Variant]) -> None:
        """The lineage edge of a new variant, and the edges that were waiting for it (children
        registered before their base, which name it by weights hash)."""
        base = (card or {}).get("base_model") or {}
        steps = (card or {}).get("history") or []
        parent_sha = base.get("weights_sha256")
        parent_id = parent.id if parent is not None else None
        if parent is not None:
            parent_sha = parent.weights_sha256
        elif parent_sha:
            row = conn.execute("SELECT id FROM variants WHERE weights_sha256 = ? AND id != ? ORDER BY "
                               "(family_id = (SELECT family_id FROM variants WHERE id = ?)) DESC, rowid DESC LIMIT 1",
                               (parent_sha, vid, vid)).fetchone()
            parent_id = row[0] if row else None
        if parent_id is not None or parent_sha or steps:
            conn.execute("INSERT INTO edges (child_id, parent_id, parent_sha256, parent_name, steps) VALUES "
                         "(?,?,?,?,?)", (vid, parent_id, parent_sha,
                                         parent.ref if parent is not None else base.get("name"), _dumps(steps)))
        conn.execute("UPDATE edges SET parent_id = ? WHERE parent_id IS NULL AND parent_sha256 = ? AND child_id != ?",
                     (vid, staged.weights_sha256, vid))

    def set_status(self, ref: Union[str, Variant], status: str, evidence: Optional[dict[str, Any]] = None) -> Variant:
        """Admit or reject a registered variant (a gate re-judged, e.g. on a re-run whose artifact
        is byte-identical, which ``add`` returns as it is), with the evidence; a variant an alias
        names cannot be rejected until the alias moves."""
        if status not in STATUSES:
            raise RegistryError(f"status {status!r} is not valid; valid: {one_of(STATUSES)}")

        def body(conn: sqlite3.Connection) -> str:
            variant = self._resolve(conn, ref)
            names = [r[0] for r in conn.execute("SELECT name FROM aliases WHERE variant_id = ? ORDER BY name",
                                                (variant.id,))]
            if status == "rejected" and names:
                raise RegistryError(f"variant {variant.id} ({variant.ref}) is the target of "
                                    f"{', '.join(variant.family + '@' + n for n in names)}; move those aliases "
                                    "before rejecting it")
            info = dict(variant.info)
            if evidence is not None:
                info["evidence"] = evidence
            conn.execute("UPDATE variants SET status = ?, info = ? WHERE id = ?", (status, _dumps(info), variant.id))
            return variant.id

        variant = self.resolve(self.db.write(body))
        self._mirrored("status", lambda m: m.variant(self, variant))
        return variant

    # --- evaluations ---------------------------------------------------------------------------

    def record_evaluation(self, ref: Union[str, Variant], result: Any, *, run: Optional[str] = None) -> Evaluation:
        """Record one evaluation of a variant: an :class:`~secateur.evaluate.results.EvalResult`
        or its dict (task, protocol, metric, value, extra, settings)."""
        return self.record_evaluations(ref, [result], run=run)[0]

    def record_evaluations(self, ref: Union[str, Variant], results: Iterable[Any], *,
                           run: Optional[str] = None) -> list[Evaluation]:
        """Record several evaluations of one variant in one transaction (all or none)."""
        rows = [self._evaluation_row(r) for r in results]

        def body(conn: sqlite3.Connection) -> list[Evaluation]:
            variant = self._resolve(conn, ref)
            if run is not None:
                self._run_row(conn, run)
            ids = [self._insert_evaluation(conn, variant.id, row, run) for row in rows]
            marks = ",".join("?" * len(ids))
            found = conn.execute("SELECT id, variant_id, task, metric, protocol, value, extra, settings, "
                                 f"data_fingerprint, machine, run_id, at FROM evaluations WHERE id IN ({marks}) "
                                 "ORDER BY id", ids).fetchall() if ids else []
            return [self._evaluation(r) for r in found]

        recorded = self.db.write(body)
        if recorded:
            self._mirrored("evaluation", lambda m: m.evaluations(self, self.resolve(recorded[0].variant_id)))
        return recorded

    @staticmethod
    def _evaluation_row(result: Any) -> dict[str, Any]:
        data = result.to_dict() if hasattr(result, "to_dict") else result
        if not isinstance(data, dict):
            raise RegistryError(f"an evaluation is an EvalResult or a dict, got {type(result).__name__}")
        missing = [k for k in ("task", "metric", "value") if k not in data]
        if missing:
            raise RegistryError(f"evaluation {data!r:.80} lacks {', '.join(missing)}; expected task, protocol, "
                                "metric, value, extra, settings (an EvalResult's fields)")
        settings = dict(data.get("settings") or {})
        fingerprint = settings.get("fingerprint") or settings.get("data_fingerprint")
        if fingerprint is None and isinstance(settings.get("data"), dict):
            fingerprint = settings["data"].get("fingerprint")
        machine = settings.get("machine")
        if isinstance(machine, dict) and settings.get("threads") is not None:
            machine = {**machine, "threads": settings["threads"]}
        value = data["value"]
        try:
            value = None if value is None else float(value)
        except (TypeError, ValueError):
            raise RegistryError(f"evaluation value {value!r} is not a number (task {data['task']!r}, metric "
                                f"{data['metric']!r})") from None
        return {"task": str(data["task"]), "metric": str(data["metric"]), "protocol": data.get("protocol"),
                "value": None if value is None or not math.isfinite(value) else value,
                "extra": _dumps(data.get("extra") or {}), "settings": _dumps(settings),
                "fingerprint": None if fingerprint is None else (fingerprint if isinstance(fingerprint, str)
                                                                 else _dumps(fingerprint)),
                "machine": _dumps(machine) if machine is not None else None}

    def _insert_evaluation(self, conn: sqlite3.Connection, vid: str, row: dict[str, Any], run: Optional[str]) -> int:
        return conn.execute("INSERT INTO evaluations (variant_id, task, metric, protocol, value, extra, settings, "
                            "data_fingerprint, machine, run_id, at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                            (vid, row["task"], row["metric"], row["protocol"], row["value"], row["extra"],
                             row["settings"], row["fingerprint"], row["machine"], run, _now())).lastrowid

    # --- aliases --------------------------------------------------------------------------------

    def set_alias(self, family: str, alias: str, ref: Union[str, Variant]) -> AliasMove:
        """Point ``family@alias`` at the variant ``ref`` names (an admitted variant of ``family``);
        the move is kept in the alias's history."""
        check_name("alias", alias)

        def body(conn: sqlite3.Connection) -> AliasMove:
            family_id = self._family_id(conn, family)
            variant = self._resolve(conn, ref)
            if variant.family != family:
                raise RegistryError(f"variant {variant.id} ({variant.ref}) belongs to family '{variant.family}', "
                                    f"not '{family}'; an alias names a variant of its own family")
            if variant.status != "admitted":
                raise RegistryError(f"variant {variant.id} ({variant.ref}) was rejected by its gates; a rejected "
                                    "variant gets no alias")
            row = conn.execute("SELECT variant_id FROM aliases WHERE family_id = ? AND name = ?",
                               (family_id, alias)).fetchone()
            previous = row[0] if row else None
            now = _now()
            conn.execute("INSERT INTO aliases (family_id, name, variant_id, updated) VALUES (?,?,?,?) "
                         "ON CONFLICT (family_id, name) DO UPDATE SET variant_id = excluded.variant_id, "
                         "updated = excluded.updated", (family_id, alias, variant.id, now))
            mid = conn.execute("INSERT INTO alias_history (family_id, alias, action, variant_id, previous_id, at) "
                               "VALUES (?, ?, 'set', ?, ?, ?)", (family_id, alias, variant.id, previous, now)).lastrowid
            return AliasMove(mid, family, alias, "set", variant.id, previous, False, now)

        move = self.db.write(body)
        self._mirrored("alias", lambda m: m.aliases(self, family))
        return move

    def _current_alias(self, conn: sqlite3.Connection, family: str, alias: str) -> tuple[int, str]:
        family_id = self._family_id(conn, family)
        row = conn.execute("SELECT variant_id FROM aliases WHERE family_id = ? AND name = ?",
                           (family_id, alias)).fetchone()
        if row is None:
            names = [r[0] for r in conn.execute("SELECT name FROM aliases WHERE family_id = ? ORDER BY name",
                                                (family_id,))]
            exists = f"its aliases: {one_of(names)}" if names else "it has no aliases"
            raise RegistryError(f"family '{family}' has no alias '{alias}'{did_you_mean(alias, names)}; {exists}")
        return family_id, row[0]

    def rollback(self, family: str, alias: str) -> AliasMove:
        """Move ``family@alias`` back to the target it had before its latest move; repeated
        rollbacks walk further back (each takes back one ``set``)."""

        def body(conn: sqlite3.Connection) -> AliasMove:
            family_id, current = self._current_alias(conn, family, alias)
            last = conn.execute("SELECT id, previous_id FROM alias_history WHERE family_id = ? AND alias = ? AND "
                                "action = 'set' AND undone = 0 ORDER BY id DESC LIMIT 1",
                                (family_id, alias)).fetchone()
            if last is None or last[1] is None:
                raise RegistryError(f"{family}@{alias} has no earlier target to roll back to (it points at {current}, "
                                    "its first target, or the earlier one was removed); set it with "
                                    f"`secateur registry alias {family}@{alias} REF`")
            previous = last[1]
            now = _now()
            conn.execute("UPDATE alias_history SET undone = 1 WHERE id = ?", (last[0],))
            conn.execute("UPDATE aliases SET variant_id = ?, updated = ? WHERE family_id = ? AND name = ?",
                         (previous, now, family_id, alias))
            mid = conn.execute("INSERT INTO alias_history (family_id, alias, action, variant_id, previous_id, at) "
                               "VALUES (?, ?, 'rollback', ?, ?, ?)", (family_id, alias, previous, current, now)).lastrowid
            return AliasMove(mid, family, alias, "rollback", previous, current, False, now)

        move = self.db.write(body)
        self._mirrored("rollback", lambda m: m.aliases(self, family))
        return move

    def drop_alias(self, family: str, alias: str) -> AliasMove:
        def body(conn: sqlite3.Connection) -> AliasMove:
            family_id, current = self._current_alias(conn, family, alias)
            return self._drop(conn, family, family_id, alias, current)

        move = self.db.write(body)
        self._mirrored("drop alias", lambda m: m.aliases(self, family))
        return move

    @staticmethod
    def _drop(conn: sqlite3.Connection, family: str, family_id: int, alias: str, current: str) -> AliasMove:
        now = _now()
        conn.execute("DELETE FROM aliases WHERE family_id = ? AND name = ?", (family_id, alias))
        mid = conn.execute("INSERT INTO alias_history (family_id, alias, action, variant_id, previous_id, at) "
                           "VALUES (?, ?, 'drop', NULL, ?, ?)", (family_id, alias, current, now)).lastrowid
        return AliasMove(mid, family, alias, "drop", None, current, False, now)

    # --- lineage and comparison -----------------------------------------------------------------

    def lineage(self, ref: Union[str, Variant]) -> LineageNode:
        """The lineage tree ``ref`` belongs to: from its root (the oldest registered ancestor, or
        the base model its ancestors' cards name) down through every descendant; the node of
        ``ref`` itself has ``target=True``."""

        def body(conn: sqlite3.Connection) -> LineageNode:
            target = self._resolve(conn, ref)
            seen = {target.id}
            top = target
            while top.parent_id is not None and top.parent_id not in seen:
                seen.add(top.parent_id)
                top = self._resolve(conn, top.parent_id)
            edge = conn.execute("SELECT parent_sha256, parent_name FROM edges WHERE child_id = ?", (top.id,)).fetchone()
            if top.parent_id is None and edge is not None and edge[0]:
                root = LineageNode(edge[1] or edge[0][:12], None, edge[0])
                kids = conn.execute("SELECT child_id FROM edges WHERE parent_id IS NULL AND parent_sha256 = ? "
                                    "ORDER BY id", (edge[0],)).fetchall()
                root.children = [self._subtree(conn, self._resolve(conn, k[0]), target.id, set()) for k in kids]
                return root
            return self._subtree(conn, top, target.id, set())

        return self.db.read(body)

    def _subtree(self, conn: sqlite3.Connection, variant: Variant, target: str, seen: set[str]) -> LineageNode:
        seen.add(variant.id)
        edge = conn.execute("SELECT steps FROM edges WHERE child_id = ?", (variant.id,)).fetchone()
        node = LineageNode(variant.ref, variant, variant.weights_sha256, _loads(edge[0], []) if edge else [],
                           target=variant.id == target)
        for (child,) in conn.execute("SELECT child_id FROM edges WHERE parent_id = ? ORDER BY id", (variant.id,)):
            if child not in seen:
                node.children.append(self._subtree(conn, self._resolve(conn, child), target, seen))
        return node

    def compare(self, refs: Iterable[Union[str, Variant]]) -> list[Compared]:
        """For each ref: the variant, its headline numbers and its latest evaluation per
        (task, metric, protocol)."""
        refs = list(refs)
        if not refs:
            raise RegistryError("compare needs at least one ref (FAMILY@ALIAS, FAMILY/NAME or a variant id)")
        out = []
        for ref in refs:
            variant = self.resolve(ref)
            latest: dict[tuple, Evaluation] = {}
            for e in self.evaluations(variant):
                latest[(e.task, e.metric, e.protocol)] = e
            out.append(Compared(variant, variant.headline(), list(latest.values())))
        return out

    # --- removal and garbage collection ---------------------------------------------------------

    def remove(self, ref: Union[str, Variant], *, force: bool = False) -> Variant:
        """Remove a variant's rows (its evaluations with it; its children keep their edge, now to a
        base known by hash). An alias target is refused unless ``force`` (which drops the aliases).
        Its files stay in the store until :meth:`gc`."""

        def body(conn: sqlite3.Connection) -> Variant:
            variant = self._resolve(conn, ref)
            aliases = conn.execute("SELECT a.family_id, a.name FROM aliases a WHERE a.variant_id = ? ORDER BY a.name",
                                   (variant.id,)).fetchall()
            if aliases and not force:
                names = ", ".join(f"{variant.family}@{a[1]}" for a in aliases)
                raise RegistryError(f"variant {variant.id} ({variant.ref}) is the target of {names}; move or drop "
                                    "those aliases first (or remove with --force, which drops them)")
            for family_id, alias in aliases:
                self._drop(conn, variant.family, family_id, alias, variant.id)
            conn.execute("DELETE FROM variants WHERE id = ?", (variant.id,))
            return variant

        removed = self.db.write(body)
        self._mirrored("remove", lambda m: (m.aliases(self, removed.family), m.removed(removed)))
        return removed

    def gc(self) -> GcReport:
        """Delete the stored objects no variant references, and the leftovers of killed copies."""

        def body(conn: sqlite3.Connection) -> tuple[list[str], list[Path], int]:
            referenced = {r[0] for r in conn.execute("SELECT DISTINCT store_key FROM variants")}
            unreferenced = [k for k in store.stored_keys(self.objects) if k not in referenced]
            return unreferenced, store.trash(self.objects, unreferenced), len(referenced)

        keys, trashed, kept = self.db.write(body)
        stale = store.stale_temporaries(self.objects)
        freed = store.delete(trashed)
        store.delete(stale)
        if keys or stale:
            log.info("registry gc: removed %d objects (%d bytes) and %d leftovers", len(keys), freed, len(stale))
        return GcReport(keys, freed, len(stale), kept)

    # --- pipeline runs --------------------------------------------------------------------------

    def start_run(self, pipeline: str, info: Optional[dict[str, Any]] = None) -> Run:
        """Record that a pipeline run started; its id goes to :meth:`add` and :meth:`record_evaluation`."""
        rid = f"r-{secrets.token_hex(6)}"
        now = _now()
        self.db.write(lambda c: c.execute("INSERT INTO runs (id, pipeline, status, started, info) VALUES "
                                          "(?, ?, 'running', ?, ?)", (rid, str(pipeline), now, _dumps(info or {}))))
        return self.run(rid)

    def finish_run(self, run: Union[str, Run], status: str = "succeeded", *, timings: Optional[dict[str, Any]] = None,
                   verdicts: Optional[list[Any]] = None) -> Run:
        rid = run.id if isinstance(run, Run) else run
        if status not in RUN_STATUSES:
            raise RegistryError(f"run status {status!r} is not valid; valid: {one_of(RUN_STATUSES)}")

        def body(conn: sqlite3.Connection) -> None:
            self._run_row(conn, rid)
            conn.execute("UPDATE runs SET status = ?, finished = ?, timings = ?, verdicts = ? WHERE id = ?",
                         (status, _now(), _dumps(timings or {}), _dumps(verdicts or []), rid))

        self.db.write(body)
        return self.run(rid)

    def _run_row(self, conn: sqlite3.Connection, rid: str) -> Run:
        row = conn.execute("SELECT id, pipeline, status, started, finished, timings, verdicts, info FROM runs "
                           "WHERE id = ?", (rid,)).fetchone()
        if row is None:
            ids = [r[0] for r in conn.execute("SELECT id FROM runs ORDER BY rowid DESC LIMIT 1000")]
            shown = f"recent runs: {one_of(ids[:5])}" if ids else "it has recorded no runs"
            raise RegistryError(f"no pipeline run '{rid}' in registry {self.home}{did_you_mean(rid, ids)}; {shown}")
        return self._run(row)

    def run(self, rid: str) -> Run:
        return self.db.read(lambda c: self._run_row(c, rid))

    def runs(self, pipeline: Optional[str] = None) -> list[Run]:
        def body(conn: sqlite3.Connection) -> list[Run]:
            sql = "SELECT id, pipeline, status, started, finished, timings, verdicts, info FROM runs"
            rows = conn.execute(sql + (" WHERE pipeline = ?" if pipeline else "") + " ORDER BY rowid",
                                (pipeline,) if pipeline else ()).fetchall()
            return [self._run(r) for r in rows]

        return self.db.read(body)

    # --- search points ---------------------------------------------------------------------------

    def record_search_points(self, run: Union[str, Run], family: str, points: Iterable[dict[str, Any]]) -> int:
        """Keep every candidate a search priced (``secateur.search``): its choices, proxies,
        measurements (or none), whether it is on the front and its variant; one transaction."""
        rid = run.id if isinstance(run, Run) else str(run)
        rows = list(points)

        def body(conn: sqlite3.Connection) -> int:
            fid = self._family_id(conn, family, create=True)
            for p in rows:
                conn.execute("INSERT OR REPLACE INTO search_points (run_id, family_id, candidate, label, choices, "
                             "proxies, measured, confirmed, front, variant_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (rid, fid, str(p["id"]), str(p["label"]), _dumps(p.get("choices") or {}),
                              _dumps(p.get("proxies") or {}),
                              None if p.get("measured") is None else _dumps(p["measured"]),
                              None if p.get("confirmed") is None else _dumps(p["confirmed"]),
                              1 if p.get("front") else 0, p.get("variant_id")))
            return len(rows)

        return self.db.write(body)

    def search_points(self, family: Optional[str] = None, run: Union[str, Run, None] = None) -> list[dict[str, Any]]:
        """The search points of ``family`` (or of one search ``run``), in the order they were kept."""
        rid = run.id if isinstance(run, Run) else run

        def body(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = ("SELECT s.run_id, f.name, s.candidate, s.label, s.choices, s.proxies, s.measured, s.confirmed, "
                   "s.front, s.variant_id FROM search_points s JOIN families f ON f.id = s.family_id")
            where, args = [], []
            if family is not None:
                where.append("s.family_id = ?")
                args.append(self._family_id(conn, family))
            if rid is not None:
                where.append("s.run_id = ?")
                args.append(rid)
            rows = conn.execute(sql + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY s.id",
                                args).fetchall()
            return [{"run_id": r[0], "family": r[1], "id": r[2], "label": r[3], "choices": _loads(r[4], {}),
                     "proxies": _loads(r[5], {}), "measured": _loads(r[6]), "confirmed": _loads(r[7]),
                     "front": bool(r[8]), "variant_id": r[9]} for r in rows]

        return self.db.read(body)

    # --- health ---------------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        tables = ("families", "variants", "edges", "evaluations", "aliases", "alias_history", "runs")
        return self.db.read(lambda c: {t: c.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables})

    def integrity(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` and ``foreign_key_check``: ``"ok"`` or the problems."""
        result = self.db.integrity()
        bad = self.db.read(lambda c: c.execute("PRAGMA foreign_key_check").fetchall())
        return result if not bad else f"{result}; {len(bad)} rows break a foreign key"


__all__ = ["Registry", "parse_ref", "looks_like_ref", "check_name"]
