"""HTTP dates (RFC 9110 §5.6.7) without reading a clock.

Theory of operation: servers always *send* IMF-fixdate, which is exactly 29
bytes ("Sun, 06 Nov 1994 08:49:37 GMT"); that fixed width is what lets the
stack overwrite the Date field of a prebuilt response in place. Recipients
must also *accept* the two obsolete forms (RFC 850 and asctime). Parsing is
strict about structure and returns None for anything invalid: an invalid
If-Modified-Since is ignored (RFC 9110 §13.1.3), never an error.
"""
import calendar
import time

__all__ = ["format_date", "parse_date", "DATE_LEN"]

DATE_LEN = 29
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_LONG_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH_NUM = {m.encode(): i + 1 for i, m in enumerate(_MONTHS)}


def format_date(t: float) -> bytes:
    """IMF-fixdate of unix time `t` (29 bytes)."""
    tm = time.gmtime(int(t))
    return b"%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        _DAYS[tm.tm_wday].encode(), tm.tm_mday, _MONTHS[tm.tm_mon - 1].encode(),
        tm.tm_year, tm.tm_hour, tm.tm_min, tm.tm_sec)


def _hms(s: bytes):
    parts = s.split(b":")
    if len(parts) != 3 or not all(len(p) == 2 and p.isdigit() for p in parts):
        return None
    h, m, sec = (int(p) for p in parts)
    if h > 23 or m > 59 or sec > 60:
        return None
    return h, m, sec


def _mk(year, mon, day, hms):
    if hms is None or mon is None or not 1 <= day <= 31:
        return None
    try:
        return calendar.timegm((year, mon, day) + hms + (0, 0, 0))
    except (ValueError, OverflowError):
        return None


def parse_date(value: bytes):
    """Unix seconds from an HTTP-date in any of the three forms, or None."""
    v = value.strip(b" \t")
    try:
        if len(v) == 29 and v[3:5] == b", " and v.endswith(b" GMT"):
            # IMF-fixdate: Sun, 06 Nov 1994 08:49:37 GMT
            d, mon, y = v[5:7], v[8:11], v[12:16]
            if not (d.isdigit() and y.isdigit() and v[4:5] == b" " and v[7:8] == b" "
                    and v[11:12] == b" " and v[16:17] == b" " and v[:3].decode() in _DAYS):
                return None
            return _mk(int(y), _MONTH_NUM.get(mon), int(d), _hms(v[17:25]))
        if b", " in v and v.endswith(b" GMT"):
            # rfc850-date: Sunday, 06-Nov-94 08:49:37 GMT
            day, rest = v.split(b", ", 1)
            if day.decode() not in _LONG_DAYS:
                return None
            dmy, hms, _gmt = rest.split(b" ")
            d, mon, yy = dmy.split(b"-")
            if not (len(d) == 2 and d.isdigit() and len(yy) == 2 and yy.isdigit()):
                return None
            # RFC 9110 §5.6.7: a two-digit year more than 50 years in the future
            # is the most recent past year with those digits; without a clock we
            # use the fixed pivot of RFC 6265-style parsers (70..99 -> 19xx).
            y = int(yy)
            y += 1900 if y >= 70 else 2000
            return _mk(y, _MONTH_NUM.get(mon), int(d), _hms(hms))
        # asctime-date: Sun Nov  6 08:49:37 1994
        parts = v.split()
        if len(parts) == 5 and parts[0].decode() in _DAYS and parts[2].isdigit() and parts[4].isdigit():
            return _mk(int(parts[4]), _MONTH_NUM.get(parts[1]), int(parts[2]), _hms(parts[3]))
    except (ValueError, UnicodeDecodeError):
        return None
    return None
