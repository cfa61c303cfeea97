"""Content types from file extensions, from a fixed table (reproducible builds).

Theory of operation: the host's /etc/mime.types differs between machines,
so the compiler never reads it. An explicit table covers the web's common
types; anything else falls back to the standard library's built-in default
table (a `mimetypes.MimeTypes()` instance reads no host files), then to
application/octet-stream. Text types get "; charset=utf-8" (RFC 9110 §8.3).
`compressible` says whether a gzip variant is worth trying.
"""
import mimetypes

__all__ = ["content_type", "compressible"]

TABLE = {
    ".html": "text/html", ".htm": "text/html", ".css": "text/css", ".js": "text/javascript",
    ".mjs": "text/javascript", ".json": "application/json", ".map": "application/json",
    ".xml": "application/xml", ".txt": "text/plain", ".md": "text/markdown", ".csv": "text/csv",
    ".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
    ".gif": "image/gif", ".webp": "image/webp", ".avif": "image/avif", ".ico": "image/x-icon",
    ".bmp": "image/bmp", ".woff": "font/woff", ".woff2": "font/woff2", ".ttf": "font/ttf",
    ".otf": "font/otf", ".eot": "application/vnd.ms-fontobject", ".wasm": "application/wasm",
    ".pdf": "application/pdf", ".zip": "application/zip", ".gz": "application/gzip",
    ".tar": "application/x-tar", ".bin": "application/octet-stream", ".iso": "application/octet-stream",
    ".mp4": "video/mp4", ".webm": "video/webm", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
    ".wav": "audio/wav", ".rss": "application/rss+xml", ".atom": "application/atom+xml",
    ".webmanifest": "application/manifest+json", ".xhtml": "application/xhtml+xml",
    ".ics": "text/calendar", ".vtt": "text/vtt", ".yaml": "text/yaml", ".yml": "text/yaml",
}

_COMPRESSIBLE = {
    "application/json", "application/xml", "image/svg+xml", "application/wasm", "application/rss+xml",
    "application/atom+xml", "application/manifest+json", "application/xhtml+xml", "image/x-icon",
    "image/bmp", "font/ttf", "font/otf", "application/vnd.ms-fontobject", "application/x-tar",
    "application/javascript",
}

_defaults = None


def _lookup(name: str) -> str:
    global _defaults
    dot = name.rfind(".")
    ext = name[dot:].lower() if dot > 0 else ""
    t = TABLE.get(ext)
    if t is None and ext:
        if _defaults is None:
            _defaults = mimetypes.MimeTypes()   # built-in table only, no host files
        t = _defaults.types_map[True].get(ext)
    return t or "application/octet-stream"


def content_type(name: str) -> str:
    """The Content-Type value for a file name."""
    t = _lookup(name)
    return t + "; charset=utf-8" if t.startswith("text/") else t


def compressible(name: str) -> bool:
    t = _lookup(name)
    return t.startswith("text/") or t in _COMPRESSIBLE
