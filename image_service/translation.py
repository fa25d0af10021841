"""Image name → URL + transport settings (pure: no I/O except reading the config files at load time).

The config shape is virtlet's (docs/image-name-translation.md), so existing translation files keep working:

    prefix: my-prefix            # optional: rules below apply to virtlet.cloud/my-prefix/<name>
    translations:
    - name: cirros               # exact name (may include a tag: "ubuntu:22.04")
      url: https://download.cirros-cloud.net/0.5.2/cirros-0.5.2-x86_64-disk.img
    - regexp: 'centos/(\\d+)-(\\d+)'
      url: https://cloud.centos.org/centos/$1/images/CentOS-$1-GenericCloud-$2.qcow2
      transport: mirror
    transports:
      mirror:
        timeout: 600000          # ms for the whole download; 0 or absent = no overall limit
        readTimeout: 30000       # ms for the connect and each read (ours; default 30 s)
        maxRedirects: 3          # default 9
        allowHTTP: false         # ours: plain http is refused unless a transport allows it
        tls: {certificates: [{cert: "<PEM>", key: "<PEM, for a client cert>"}], serverName: x, insecure: false}

Differences from virtlet, on purpose:
- Regexps must match the whole name (virtlet searched anywhere in it, so `cirros` matched `evil/cirros-x`),
  and are always enabled (virtlet needed IMAGE_REGEXP_TRANSLATION).
- `proxy` is refused at load time: a proxy would defeat the address deny list (we connect to the address we
  checked). A certificate without `key` is trusted as a CA; one with a key is the client certificate.
- Precedence is deterministic: exact names (tried as `name:tag`, then `name`) in all configs whose prefix
  matches, in load order, then regexps (matched against the name without its tag, as virtlet did: the
  kubelet adds `:latest` to most names) in load order. A duplicate exact name is a load error.
- Without a matching rule `virtlet.cloud/<path>` → `https://<path>` (tags and digests stripped), with the
  built-in transport (https only). A file may hold several configs (YAML documents) and may be a
  `VirtletImageMapping` object (its `spec` is the config), so the CRD source can reuse this model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from image_service.errors import PolicyError
from image_service.names import ImageName
from image_service.urlpolicy import check_url

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PREFIX_RE = re.compile(rf"(?:{_COMPONENT}(?:/{_COMPONENT})*)?", re.ASCII)
_REF_RE = re.compile(r"\$(?:(\$)|\{(\w+)\}|(\d+)|([A-Za-z_]\w*))")  # $$, ${x}, $1, $name


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSCertificate(_Model):
    cert: str
    key: str | None = None


class TLSConfig(_Model):
    certificates: list[TLSCertificate] = []
    serverName: str | None = None
    insecure: bool = False


class Transport(_Model):
    timeout: int = Field(0, ge=0)  # ms, whole download (virtlet's meaning); 0 = none
    readTimeout: int = Field(30_000, gt=0)  # ms, connect and each read
    maxRedirects: int | None = Field(None, ge=0, le=20)
    allowHTTP: bool = False
    tls: TLSConfig | None = None
    proxy: str | None = None

    @field_validator("proxy")
    @classmethod
    def _no_proxy(cls, v):
        if v:
            raise ValueError("proxy is not supported (it would bypass the address deny list)")
        return v

    @property
    def redirects(self) -> int:
        return 9 if self.maxRedirects is None else self.maxRedirects


DEFAULT_TRANSPORT = Transport()


class Rule(_Model):
    name: str | None = None
    regexp: str | None = None
    url: str
    transport: str = ""

    @model_validator(mode="after")
    def _one_matcher(self):
        if (self.name is None) == (self.regexp is None):
            raise ValueError("a rule needs exactly one of `name` and `regexp`")
        if self.regexp is not None:
            try:
                pattern = re.compile(self.regexp)
            except re.error as e:
                raise ValueError(f"regexp {self.regexp!r} does not compile: {e}") from None
            for m in _REF_RE.finditer(self.url):
                ref = m[2] or m[3] or m[4]
                if ref and not (ref.isdigit() and int(ref) <= pattern.groups) and ref not in pattern.groupindex:
                    raise ValueError(f"url {self.url!r} refers to ${ref}, which regexp {self.regexp!r} does not define")
        return self

    @property
    def label(self) -> str:
        return f"name {self.name!r}" if self.name is not None else f"regexp {self.regexp!r}"


class TranslationConfig(_Model):
    prefix: str = ""
    translations: list[Rule] = []
    transports: dict[str, Transport] = {}

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        v = v.strip("/")
        if not _PREFIX_RE.fullmatch(v):
            raise ValueError(f"prefix {v!r} is not a valid image path")
        return v

    @model_validator(mode="after")
    def _rules_are_usable(self):
        for rule in self.translations:
            if rule.transport and rule.transport not in self.transports:
                raise ValueError(f"rule {rule.label}: transport {rule.transport!r} is not defined in `transports`")
            # A regexp's URL is checked with its $n replaced; fetch.py checks the real URL again.
            url = rule.url if rule.regexp is None else _REF_RE.sub(lambda m: "$" if m[1] else "x", rule.url)
            try:
                check_url(url, self.transport_for(rule).allowHTTP)
            except PolicyError as e:
                raise ValueError(f"rule {rule.label}: {e}") from None
        return self

    def transport_for(self, rule: Rule) -> Transport:
        # virtlet: a transport named "" applies to the config's rules that name none.
        return self.transports.get(rule.transport, DEFAULT_TRANSPORT)


@dataclass(frozen=True)
class Endpoint:
    url: str
    transport: Transport
    rule: str  # where the URL came from, for messages and logs


class ConfigError(ValueError):
    pass


class Translator:
    def __init__(self, configs: list[tuple[str, TranslationConfig]] = ()):
        self._configs = list(configs)
        self._compiled = {r.regexp: re.compile(r.regexp) for _, c in self._configs for r in c.translations if r.regexp}
        seen: dict[tuple[str, str], str] = {}
        for source, cfg in self._configs:
            for r in cfg.translations:
                if r.name is not None:
                    key = (cfg.prefix, r.name)
                    if key in seen:
                        raise ConfigError(f"{source}: name {r.name!r} (prefix {cfg.prefix!r}) is already "
                                          f"translated by {seen[key]}")
                    seen[key] = source

    def translate(self, image: ImageName) -> Endpoint:
        candidates = []  # (config, unprefixed names to try, most specific first)
        for source, cfg in self._configs:
            if cfg.prefix and not image.path.startswith(cfg.prefix + "/"):
                continue
            rest = image.path[len(cfg.prefix) + 1:] if cfg.prefix else image.path
            names = [f"{rest}:{image.tag}", rest] if image.tag else [rest]
            candidates.append((source, cfg, names))
        for source, cfg, names in candidates:
            for name in names:
                for r in cfg.translations:
                    if r.name == name:
                        return Endpoint(r.url, cfg.transport_for(r), f"{source}: {r.label}")
        for source, cfg, names in candidates:
            for r in cfg.translations:  # regexps see the name without its tag, as in virtlet
                if r.regexp and (m := self._compiled[r.regexp].fullmatch(names[-1])):
                    return Endpoint(_expand(r.url, m), cfg.transport_for(r), f"{source}: {r.label}")
        return Endpoint(f"https://{image.path}", DEFAULT_TRANSPORT, "default (https://<name>)")


def _expand(template: str, m: re.Match) -> str:
    def ref(r: re.Match) -> str:
        if r[1]:
            return "$"
        key = r[2] or r[3] or r[4]
        return m.group(int(key) if key.isdigit() else key) or ""
    return _REF_RE.sub(ref, template)


def parse_documents(docs: list, source: str) -> list[tuple[str, TranslationConfig]]:
    out = []
    for i, doc in enumerate(docs):
        if doc is None:
            continue
        where = source if len(docs) == 1 else f"{source} (document {i + 1})"
        if isinstance(doc, dict) and doc.get("kind") == "VirtletImageMapping":
            doc = doc.get("spec") or {}
        try:
            out.append((where, TranslationConfig.model_validate(doc)))
        except ValidationError as e:
            raise ConfigError(f"{where}: invalid image translation config:\n{_describe(e, doc)}") from None
    return out


def load(path: str | Path | None) -> Translator:
    """A Translator from a YAML file or a directory of *.yaml/*.yml files; no path = defaults only."""
    if path is None:
        return Translator()
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    configs = []
    for f in files:
        try:
            docs = list(yaml.safe_load_all(f.read_text()))
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{f}: cannot read image translation config: {e}") from None
        configs += parse_documents(docs, str(f))
    return Translator(configs)


def _describe(e: ValidationError, doc) -> str:
    lines = []
    for err in e.errors():
        loc = list(err["loc"])
        # Name the rule by what it matches, not only by its index.
        if len(loc) >= 2 and loc[0] == "translations" and isinstance(loc[1], int) and isinstance(doc, dict):
            try:
                rule = doc["translations"][loc[1]]
                label = rule.get("name") or rule.get("regexp")
                loc[1] = f"{loc[1]} ({label!r})" if label else loc[1]
            except (KeyError, IndexError, TypeError, AttributeError):
                pass
        msg = err["msg"].removeprefix("Value error, ")
        where = ".".join(str(x) if x != "" else '""' for x in loc) or "(top level)"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)
