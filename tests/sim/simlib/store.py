"""Installed models: Ollama-style manifests under OLLAMA_MODELS, names as types/model/name.go."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import logs
from .catalog import ModelSpec

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,349}$")
_PART_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
_NS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,79}$")


@dataclass(frozen=True)
class Name:
    """A fully qualified model name: host/namespace/model:tag."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def display(self) -> str:
        """The shortest form, as Ollama shows it (`phi3:latest`)."""
        if self.host == DEFAULT_HOST:
            if self.namespace == DEFAULT_NAMESPACE:
                return f"{self.model}:{self.tag}"
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    def key(self) -> tuple[str, str, str, str]:
        """Case-insensitive identity (Ollama matches names case-insensitively)."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())


def parse_name(s: str) -> Name | None:
    """Parse and normalise a model name; None when it is invalid (model.ParseName + IsValid)."""
    s = s.strip()
    if not s:
        return None
    s = s.split("@", 1)[0]
    slash = s.rfind("/")
    colon = s.rfind(":")
    tag = DEFAULT_TAG
    if colon > slash:
        s, tag = s[:colon], s[colon + 1 :]
    parts = s.split("/")
    if len(parts) == 1:
        host, ns, model = DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]
    elif len(parts) == 2:
        host, ns, model = DEFAULT_HOST, parts[0], parts[1]
    elif len(parts) == 3:
        host, ns, model = parts
    else:
        return None
    ok = _HOST_RE.match(host) and _NS_RE.match(ns) and _PART_RE.match(model) and _PART_RE.match(tag)
    return Name(host, ns, model, tag) if ok else None


@dataclass(frozen=True)
class Installed:
    """A model present in OLLAMA_MODELS."""

    name: Name
    spec: ModelSpec
    digest: str
    modified_ns: int
    # The params layer (Modelfile PARAMETERs): the catalog's, or what /api/create wrote.
    parameters: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # The model layer's `from`: the model it was created from (details.parent_model).
    parent: str = ""

    @property
    def display(self) -> str:
        """The short name."""
        return self.name.display


class Store:
    """Reads and writes manifests; every call re-reads the disk like Ollama's Manifests()."""

    def __init__(self, models_dir: Path, catalog: list[ModelSpec]) -> None:
        self.root = models_dir
        self.manifests = models_dir / "manifests"
        self.tombstones = models_dir / "sim-deleted.json"
        self.catalog = catalog
        self._by_catalog_name: dict[tuple[str, str, str, str], ModelSpec] = {}
        for spec in catalog:
            for n in (spec.name, *spec.aliases):
                parsed = parse_name(n)
                if parsed is not None:
                    self._by_catalog_name[parsed.key()] = spec

    def catalog_spec(self, name: Name) -> ModelSpec | None:
        """The catalog model a pull of `name` would fetch."""
        return self._by_catalog_name.get(name.key())

    def _spec_named(self, catalog_name: str) -> ModelSpec | None:
        for spec in self.catalog:
            if spec.name == catalog_name:
                return spec
        return None

    def _path(self, name: Name) -> Path:
        return self.manifests / name.host / name.namespace / name.model / name.tag

    def _read_tombstones(self) -> set[str]:
        try:
            data = json.loads(self.tombstones.read_text(encoding="utf-8"))
            return {str(x).lower() for x in data}
        except (OSError, ValueError):
            return set()

    def _write_tombstones(self, names: set[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.tombstones, json.dumps(sorted(names)).encode())

    def materialize_presets(self) -> None:
        """Write manifests for `pulled = true` catalog models unless a delete was recorded."""
        dead = self._read_tombstones()
        for spec in self.catalog:
            if not spec.pulled:
                continue
            name = parse_name(spec.name)
            if name is None or name.display.lower() in dead or self.get(name) is not None:
                continue
            self.write(name, spec)

    def write(
        self,
        name: Name,
        spec: ModelSpec,
        parameters: dict[str, Any] | None = None,
        parent: str = "",
    ) -> None:
        """Record `name` as installed (pull, copy, create); clears any recorded delete.

        `parameters` (a create's, merged over its source's) go in a params layer of their own,
        so that the manifest, and with it the digest, differs from the source's while the model
        blob is the same one (server/create.go setParameters)."""
        model_layer: dict[str, Any] = {
            "mediaType": "application/vnd.ollama.image.model",
            "digest": "sha256:" + spec.blob_digest,
            "size": spec.size,
        }
        if parent:
            model_layer["from"] = parent
        layers = [model_layer]
        sim: dict[str, Any] = {"catalog_name": spec.name}
        if parameters is not None:
            blob = json.dumps(parameters, separators=(",", ":")).encode()
            layers.append(
                {
                    "mediaType": "application/vnd.ollama.image.params",
                    "digest": "sha256:" + hashlib.sha256(blob).hexdigest(),
                    "size": len(blob),
                }
            )
            sim["parameters"] = parameters
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": "sha256:"
                + hashlib.sha256(f"sim-config:{spec.name}".encode()).hexdigest(),
                "size": 0,
            },
            "layers": layers,
            "simulator": sim,
        }
        self._put(name, json.dumps(manifest, separators=(",", ":")).encode())

    def copy(self, src: Installed, dst: Name) -> None:
        """/api/copy: the source's manifest, byte for byte (so the digest is the same)."""
        self._put(dst, self._path(src.name).read_bytes())

    def _put(self, name: Name, manifest: bytes) -> None:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, manifest)
        dead = self._read_tombstones()
        if name.display.lower() in dead:
            dead.discard(name.display.lower())
            self._write_tombstones(dead)

    def _load(self, name: Name, path: Path) -> Installed | None:
        try:
            raw = path.read_bytes()
            st = path.stat()
            doc = json.loads(raw)
            catalog_name = doc["simulator"]["catalog_name"]
            params = doc["simulator"].get("parameters")
            parent = str(doc["layers"][0].get("from") or "")
        except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
            return None
        spec = self._spec_named(catalog_name)
        if spec is None:
            logs.warn(
                "images.go:1", "manifest names a model missing from the catalog", name=name.display
            )
            return None
        if not isinstance(params, dict):
            params = spec.default_parameters
        digest = hashlib.sha256(raw).hexdigest()
        return Installed(name, spec, digest, st.st_mtime_ns, params, parent)

    def list(self) -> list[Installed]:
        """Every installed model, newest first."""
        out: list[Installed] = []
        if not self.manifests.is_dir():
            return out
        for path in self.manifests.glob("*/*/*/*"):
            if not path.is_file() or ".tmp" in path.name:
                continue
            rel = path.relative_to(self.manifests).parts
            name = Name(*rel)
            item = self._load(name, path)
            if item is not None:
                out.append(item)
        out.sort(key=lambda m: m.modified_ns, reverse=True)
        return out

    def get(self, name: Name) -> Installed | None:
        """The installed model of that name (case-insensitive), or None."""
        path = self._path(name)
        if path.is_file():
            return self._load(name, path)
        for item in self.list():
            if item.name.key() == name.key():
                return item
        return None

    def delete(self, name: Name) -> bool:
        """Remove a manifest; record the delete so a `pulled = true` preset stays deleted."""
        item = self.get(name)
        if item is None:
            return False
        with contextlib.suppress(FileNotFoundError):
            self._path(item.name).unlink()
        dead = self._read_tombstones()
        dead.add(item.name.display.lower())
        self._write_tombstones(dead)
        return True


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    tmp.replace(path)
