"""Object-store options, storage pre-flight checks, and keeping secrets out of what negprep prints.

The job's `storage:` mapping is written in plain words and translated here for s3fs, so users need
not know s3fs's nesting (`client_kwargs`, `config_kwargs`). Credentials come from the standard AWS
chain (environment, profile, instance role) unless the job gives `key`/`secret`/`token`; the
endpoint from `storage.endpoint_url`, else `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`.

Everything negprep writes or prints that could carry a secret (manifest, summary, error messages,
log lines) goes through `redact`: credentials embedded in URLs, signed query parameters, secret
option values and the AWS secrets of the environment become `***`.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Iterable
from typing import Any

S3 = ("s3", "s3a")
# friendly name -> where s3fs wants it: a top-level kwarg, or a key inside client_kwargs / config_kwargs.s3
_TOP = {"endpoint_url", "key", "secret", "token", "profile", "anon"}
_CLIENT = {"region": "region_name", "verify": "verify"}
_ALIASES = {
    "aws_access_key_id": "key",
    "aws_secret_access_key": "secret",
    "aws_session_token": "token",
    "aws_endpoint_url": "endpoint_url",
    "aws_region": "region",
    "region_name": "region",
    "aws_profile": "profile",
}
FRIENDLY = _TOP | set(_CLIENT) | {"addressing_style"}
# keys of fsspec's own (listing cache, instance cache) that every filesystem accepts
_FSSPEC = {"use_listings_cache", "listings_expiry_time", "max_paths", "skip_instance_cache"}
# whole words of an option or variable name: `aws_secret_access_key`, `sas_token`, but not `tokenizer`
_SECRET_KEY = re.compile(r"(^|_)(key|secret|token|password|passwd|credentials?|username|signature)($|_)")
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/@\s:'\"]*):(?P<pw>[^/@\s'\"]+)@")
_SIGNED_PARAM = re.compile(
    r"(?P<k>[?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|secret|password|"
    r"access_token|api_key|key)=)(?P<v>[^&\s'\"]+)",
    re.IGNORECASE,
)
_remembered: set[str] = set()
MASK = "***"


def protocol(url: str) -> str:
    """The fsspec protocol of a URL ("file" for a plain path); for a chained URL, the innermost."""
    last = url.split("::")[-1]
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", last)
    return m.group(1).lower() if m else "file"


def is_s3(url: str) -> bool:
    return protocol(url) in S3


def _env_endpoint() -> str | None:
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def fs_options(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The fsspec keyword arguments for `url` from the job's `storage` mapping.

    Local paths get none. s3:// gets the friendly keys translated for s3fs, the environment's
    endpoint when the job names none (read here too, so it does not depend on the botocore
    version), and no listings cache: stages list folders that other processes write into.
    Other protocols get the options as given, minus the S3-only friendly keys.
    """
    options = dict(options or {})
    proto = protocol(url)
    if proto in ("file", "local"):
        return {}
    if proto not in S3:
        return {k: v for k, v in options.items() if k not in FRIENDLY and k not in _ALIASES}
    out: dict[str, Any] = {"use_listings_cache": False}
    client: dict[str, Any] = dict(options.pop("client_kwargs", None) or {})
    config: dict[str, Any] = dict(options.pop("config_kwargs", None) or {})
    for k, v in options.items():
        k = _ALIASES.get(k, k)
        if k in _CLIENT:
            client[_CLIENT[k]] = v
        elif k == "addressing_style":
            config["s3"] = {**config.get("s3", {}), "addressing_style": v}
        else:
            out[k] = v
    if not out.get("endpoint_url") and not client.get("endpoint_url") and (env := _env_endpoint()):
        out["endpoint_url"] = env
    if client:
        out["client_kwargs"] = client
    if config:
        out["config_kwargs"] = config
    return out


def _s3fs_parameters() -> set[str]:
    try:
        import s3fs
    except ImportError:
        return set()
    params = inspect.signature(s3fs.S3FileSystem.__init__).parameters
    return {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {
        "self",
        "loop",
        "asynchronous",
        "session",
    }


def check_options(options: dict[str, Any], urls: Iterable[str]) -> None:
    """Raise ValueError naming the first bad `storage` key; a typo would otherwise be ignored by s3fs."""
    if not any(is_s3(u) for u in urls):
        return
    known = FRIENDLY | set(_ALIASES) | _FSSPEC | _s3fs_parameters()
    for k, v in options.items():
        if k not in known:
            raise ValueError(f"storage: unknown key '{k}' for s3:// (known: {', '.join(sorted(FRIENDLY))}, or s3fs's)")
        name = _ALIASES.get(k, k)
        if name == "endpoint_url" and not (isinstance(v, str) and re.match(r"^https?://[^/\s]+", v)):
            raise ValueError(f"storage: {k} must be an http:// or https:// URL")
        if name == "addressing_style" and v not in ("auto", "path", "virtual"):
            raise ValueError(f"storage: {k} must be auto, path or virtual")
        if name in ("anon",) and not isinstance(v, bool):
            raise ValueError(f"storage: {k} must be true or false")


# ---------------------------------------------------------------------------------------------
# Secrets


def is_secret_key(name: str) -> bool:
    return bool(_SECRET_KEY.search(str(name).lower()))


def secret_values(obj: Any, keys: bool = True) -> set[str]:
    """Secrets in a JSON-like object: values of secret-looking keys (unless `keys` is false), and
    passwords embedded in URLs (which may reach messages in forms the URL pattern does not catch)."""
    found: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            if keys and is_secret_key(k) and isinstance(v, str) and v:
                found.add(v)
            else:
                found |= secret_values(v, keys)
    elif isinstance(obj, list | tuple):
        for v in obj:
            found |= secret_values(v, keys)
    elif isinstance(obj, str):
        found |= {m["pw"] for m in _URL_USERINFO.finditer(obj)}
    return found


def remember_secrets(job: dict[str, Any]) -> None:
    """Make `redact` mask a job's secrets from now on, in this process: the secret-looking values
    of its `storage` options and passwords in any of its URLs (other keys are not guessed at)."""
    _remembered.update(secret_values(job.get("storage") or {}), secret_values(job, keys=False))


def _all_secrets(extra: Iterable[str] = ()) -> list[str]:
    env = {os.environ[k] for k in _SECRET_ENV if os.environ.get(k)}
    # longest first, so a secret containing another is masked whole; short strings are not secrets
    return sorted({s for s in (*_remembered, *env, *extra) if len(s) >= 6}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with URL credentials, signed query parameters and known secret values masked."""
    if not isinstance(text, str) or not text:
        return text
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    text = _SIGNED_PARAM.sub(lambda m: f"{m['k']}{MASK}", text)
    for s in _all_secrets(secrets):
        text = text.replace(s, MASK)
    return text


def redact_options(options: Any) -> Any:
    """Storage options as they may be saved: secret-looking keys' values masked, the rest kept."""
    if isinstance(options, dict):
        return {k: MASK if is_secret_key(k) and v not in (None, "") else redact_options(v) for k, v in options.items()}
    if isinstance(options, list):
        return [redact_options(v) for v in options]
    return redact(options) if isinstance(options, str) else options


def redact_obj(obj: Any, secrets: Iterable[str] = ()) -> Any:
    """A copy of a JSON-like object with every string redacted (keys are kept: manifests have
    harmless keys such as `passage_key`; mask option mappings with `redact_options`)."""
    secrets = list(secrets)
    if isinstance(obj, dict):
        return {k: redact_obj(v, secrets) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [redact_obj(v, secrets) for v in obj]
    if isinstance(obj, str):
        return redact(obj, secrets)
    return obj


class RedactingFilter(logging.Filter):
    """Masks secrets in log records before any handler formats them."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        masked = redact(msg)
        if masked != msg:
            record.msg, record.args = masked, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Attach `RedactingFilter` to the handlers of `logger` (default: root), where records from
    every child logger pass. Also keeps the AWS clients' INFO lines (which credential source they
    found) out of the job's log: an error stays one line on stderr."""
    for name in ("botocore", "aiobotocore", "s3fs"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for h in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter())


def ray_env() -> dict[str, str]:
    """The AWS_* variables for Ray's runtime_env: endpoint, region, profile, but no keys, since Ray
    logs the runtime_env (runtime_env_agent.log). Keys travel with `with_env_credentials`."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_") and not is_secret_key(k)}


_CRED_ENV = {"key": "AWS_ACCESS_KEY_ID", "secret": "AWS_SECRET_ACCESS_KEY", "token": "AWS_SESSION_TOKEN"}
_OWN_CREDENTIALS = {"key", "secret", "token", "username", "password", "profile", "anon", "session"}


def with_env_credentials(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """Options for rebuilding a folder in another process (a Ray worker, maybe on another machine).

    For s3:// without credentials of the job's own, this process's AWS keys from the environment
    are added, so workers use the driver's credentials. They travel in task arguments, which Ray
    does not log, unlike its runtime_env.
    """
    if not is_s3(url) or not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
        return options
    named = {_ALIASES.get(k, k) for k in options} | set(options.get("client_kwargs") or {})
    if named & (_OWN_CREDENTIALS | {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"}):
        return options
    return {**options, **{k: os.environ[v] for k, v in _CRED_ENV.items() if os.environ.get(v)}}


# ---------------------------------------------------------------------------------------------
# Pre-flight: storage problems as one line, before Ray starts (inside Ray they arrive wrapped)


def _chain(e: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while e is not None and e not in seen:
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _first_line(e: BaseException) -> str:
    """The message on one line (botocore spreads some over several), cut to a readable length."""
    text = " ".join(str(e).split())
    return (text[:297] + "...") if len(text) > 300 else text or type(e).__name__


def explain(e: BaseException, url: str) -> str | None:
    """A one-line message for a storage failure at `url`, or None if `e` is not one."""
    where = redact(url)
    chain = _chain(e)
    names = {type(x).__name__ for x in chain}
    text = " ".join(_first_line(x) for x in chain)
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerTimeoutError"} or (
        "Could not connect to the endpoint" in text
    ):
        return f"{where}: cannot reach the storage endpoint ({redact(_first_line(e))})"
    if "NoCredentialsError" in names or "Unable to locate credentials" in text:
        return (
            f"{where}: no storage credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or storage.key and storage.secret)"
        )
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower() or "bucket is not valid" in text.lower():
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return f"{where}: bucket '{redact(bucket)}' does not exist or is not a valid bucket name"
    if any(isinstance(x, PermissionError) for x in chain) or names & {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return f"{where}: access denied ({redact(_first_line(e))})"
    if any(type(x).__module__.startswith(("botocore", "aiobotocore", "aiohttp")) for x in chain):
        return f"{where}: storage error ({redact(_first_line(e))})"
    return None
