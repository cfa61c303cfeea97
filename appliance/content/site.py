"""The lookup tables of a loaded store: which URL path maps to which responses.

Theory of operation: the compiler resolves every file of the site to a
normalized, percent-decoded URL path ("/css/site.css", "/docs/" for
docs/index.html, which is also reachable as "/docs/index.html"), prebuilds
every response for it and records their indices; loading turns the indices
into `Response` objects. Lookup at serve time is one dict access on the
normalized path: the site root can never be escaped because the file system
is never consulted.
"""

__all__ = ["Resource", "Site"]


class Resource:
    """One URL path that maps to a file, with all its prebuilt responses."""

    __slots__ = ("path", "size", "etag", "gzip_etag", "last_modified", "content_type",
                 "get", "head", "not_modified", "gzip_get", "gzip_head", "gzip_not_modified",
                 "body_off", "vary", "cache_control", "file")

    def __init__(self, path, size, etag, gzip_etag, last_modified, content_type, get, head,
                 not_modified, gzip_get, gzip_head, gzip_not_modified, body_off, vary=False,
                 cache_control=b"", file=""):
        self.path = path
        self.size = size
        self.etag = etag
        self.gzip_etag = gzip_etag
        self.last_modified = last_modified
        self.content_type = content_type
        self.get = get
        self.head = head
        self.not_modified = not_modified
        self.gzip_get = gzip_get
        self.gzip_head = gzip_head
        self.gzip_not_modified = gzip_not_modified
        self.body_off = body_off          # identity body, offset in Store.blob
        self.vary = vary                  # responses carry "Vary: Accept-Encoding"
        self.cache_control = cache_control
        self.file = file                  # the source file, relative to the site root

    def __repr__(self):
        return f"Resource({self.path!r}, size={self.size}, gzip={self.gzip_get is not None})"


class Site:
    """resources by normalized path; redirects ("/dir" -> 301 "/dir/"); error pages by status."""

    __slots__ = ("resources", "redirects", "redirects_head", "errors", "server", "responses", "date", "cache")

    def __init__(self, resources, redirects, redirects_head, errors, server=b"haboob", responses=(),
                 date=b"Thu, 01 Jan 1970 00:00:00 GMT"):
        self.resources = resources
        self.redirects = redirects
        self.redirects_head = redirects_head
        self.errors = errors
        self.server = server
        self.responses = responses        # every Response of the store, by index
        self.date = date                  # the placeholder Date value stored in every response
        self.cache = None                 # owned by appliance.http: {Limits: {raw request: Reply}}

    def urls(self):
        """All URL paths that answer 200, sorted."""
        return sorted(self.resources)
