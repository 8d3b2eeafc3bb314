#!/usr/bin/env python3
"""beuss: a dead-simple message bus in one file.

    python beuss.py [SERVE]               serve named queues on 127.0.0.1:6552
    echo hi | python beuss.py PUT jobs    put a message (stdin, an argument,
                                          --file, or --lines: one a line;
                                          --delay 30s: ready later; --id
                                          KEY: once per key; --ttl 1h)
    python beuss.py GET jobs [out.bin]    take one message (--wait SECONDS)
    python beuss.py ON jobs               take messages as they come (--exec,
                                          --count, --timeout, --separator)
    python beuss.py PEEK jobs [N] | DEL jobs... | LEN jobs | LIST
    python beuss.py PEEK jobs.dead --why | REDRIVE jobs   (dead letters)
    python beuss.py PAUSE jobs | RESUME jobs   (stop, restart deliveries)
    python beuss.py QUEUE jobs max-length 10000 rate 10/s   (a queue's own
                                          settings: bounds, a rate, ids)
    python beuss.py PUB news [message]    publish to a channel's subscribers
    python beuss.py SUB news 'sport.*'    print what is published (--exec,
                                          --count, --timeout, --channel)
    python beuss.py PING | STATS | TOP | BENCH
    python beuss.py --http 8080           also serve a status page, /metrics

Queues hold binary messages, first in, first out, in memory or (--data FILE)
in an SQLite file. RESERVE, ACK, NACK and TOUCH deliver at least once: a
reserved message goes back to the head of its queue if its consumer goes
away unacknowledged, after a wait that doubles if it failed, and to
<queue>.dead, saying why, after --max-deliveries tries.
Channels fan a message out to their subscribers at once and keep nothing.
The server speaks the Redis protocol (RESP2, and RESP3 after HELLO 3): the
list commands, DEL EXISTS TYPE KEYS SCAN DBSIZE FLUSHDB FLUSHALL,
transactions, pub/sub, and what clients ask of a server (HELLO AUTH CLIENT
COMMAND CONFIG INFO ...; COMMAND LIST names them all, from the command
table below): redis-cli, redis-py and other Redis clients work against it.
The client half of this file works against Redis, Valkey or a Redis
Cluster too, with the same guarantees: Lua scripts stand in for RESERVE.

Limits: a message is at most 10240 bytes unless --max-message-size (or
BMAXMESSAGESIZE) says otherwise, 512 MiB at most; a request has at most
1,048,576 arguments; an inline request line is at most 64 KiB; the server
takes 10000 connections (500 on Windows) unless --max-clients says otherwise;
queued messages take at most --max-memory (half the machine's by default); a
client may send at most --max-input (32 MiB) ahead, 64 KiB while it waits,
and is not read while 1 MiB of its replies wait unsent; a subscriber that
does not read is closed at 32 MiB of unsent messages, or 8 MiB for 60
seconds. Beyond loopback the server needs --token (or --no-protected-mode);
--tls-cert and --tls-key serve TLS.

The file, top to bottom (`grep '^# ## '` lists it):

    Constants, Errors     defaults, limits, reply texts; who is at fault
    Helpers               small functions every part uses
    Protocol              RESP on bytes: RequestReader, ReplyReader
    Patterns              glob matching as Redis's stringmatchlen
    Queues                messages (long queues packed), waiters, holders,
                          pauses (no sockets)
    Channels              pub/sub subscriptions (no sockets)
    Store                 the queues in SQLite, and what is durable when
    Connections           sockets, reading, writing, TLS, one close path
    Server                the loop, one pass at a time, and its services
    Commands              a small function a command, by family
    The command table     a row a command: arity, flags, docs
    Settings              a row a setting: flag, environment, default
    The status page       the page, /metrics, /status.json, its actions
    Links                 the client's connections, a cluster's slots, Lua
    Client                Client, put, get, on: beuss, Redis or a cluster
    Command line          main(): SERVE, PUT, GET, ON and the other verbs

Standard library only, CPython 3.7 or newer. MIT licence.
"""

__version__ = "0.1.0"
__all__ = [
    "BeussError", "ProtocolError", "ReplyError", "ConnectionFailed",
    "Queues", "Channels", "Server", "Client", "put", "get", "on", "main",
    "key_slot",
]

import array
import collections
import errno
import heapq
import itertools
import os
import selectors
import socket
import sys
import time


# ## Constants ################################################################

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 6552
DEFAULT_MAX_MESSAGE_SIZE = 10240
DEFAULT_MAX_DELIVERIES = 10
DEFAULT_RETRY_DELAY = 1.0       # seconds a first failure waits; doubles
DEFAULT_RETRY_MAX_DELAY = 300.0  # the longest wait between two deliveries
DEFAULT_SCRIPT_LEASE = 60.0     # a lease on Redis, where no connection is
                                # watched: a dead consumer's messages return
DEFAULT_STOP_TIMEOUT = 30.0     # a stopping consumer's time to finish
# selectors.SelectSelector, what Windows gets, cannot watch more than 512
# sockets; keep room for the listener and the wake-up pair.
DEFAULT_MAX_CLIENTS = 500 if sys.platform == "win32" else 10000
DEFAULT_MAX_HTTP_CLIENTS = 100

RESERVED_DESCRIPTORS = 32               # kept for the listener, files, ...
SELECT_SOCKETS = 512                    # what select() watches on Windows
MAX_BULK_LENGTH = 512 * 1024 * 1024     # Redis's proto-max-bulk-len
MAX_ARGUMENTS = 1024 * 1024             # arguments in one request
MAX_INLINE_LENGTH = 64 * 1024           # an inline line, or a length line
UNAUTHENTICATED_ARGUMENTS = 10          # before AUTH, as Redis allows
UNAUTHENTICATED_BULK = 16 * 1024
SMALL_PIECE = 4096                      # a read this small joins the last
OUTPUT_LIMIT = 1024 * 1024              # unsent replies that stop reading
WRITE_SLICE = 256 * 1024                # replies joined for one send
WAITING_INPUT_LIMIT = 64 * 1024         # read ahead by a blocked client
REQUESTS_PER_PASS = 1000                # one client's share of a loop pass
MOVE_SLICE = 1000               # messages moved in one pass (REDRIVE, due)
DEFAULT_MAX_INPUT = 32 * 1024 * 1024
HOUSEKEEPING_INTERVAL = 1.0
STORE_RETRY = 1.0               # seconds a failing store waits to write again
MAX_DELAY = 10 ** 9             # seconds a message may be set aside (31 years)
REDIS_VERSION = "7.0.15"        # the Redis whose behaviour beuss follows
MAX_REASON = 1000               # characters of why a message failed, kept
SEEN_COST = 100                 # bytes an id of PUT ... ID takes, beyond it
FORGET_SLICE = 50000            # ids forgotten in one housekeeping, at most
SAMPLE_INTERVAL = 10            # seconds between samples of each queue
MINUTE_SAMPLES = 7              # a minute of them, and one before
HISTORY = 900                   # seconds of samples kept (15 minutes)
MAX_MARKS = 512                 # arrival marks a queue keeps
MAX_COUNTED = 10000             # queues whose counts are kept
HTTP_MAX_REQUEST = 8192         # bytes of an HTTP request line and headers
HTTP_TIMEOUT = 10.0             # seconds an HTTP client may take nothing
HTTP_MAX_EXCHANGE = 60.0        # seconds an HTTP exchange may last
SNAPSHOT_INTERVAL = 1.0         # the status page's numbers are this fresh
STATUS_SLICE = 100              # queues a snapshot looks at in one pass
BODY_SLICE = 16 * 1024          # bytes of an HTTP answer made in one pass
PAGE_QUEUES = 100               # queues the status page shows
JSON_PAGE = 1000                # queues a page of /status.json holds
ACCEPT_RETRY = 0.1                      # after running out of descriptors
TLS_HANDSHAKE_TIMEOUT = 10.0
MAX_FAILED_AUTHS = 3                    # wrong tokens before the close
READ_SIZE = 64 * 1024
SELECT_TIMEOUT_MAX = 1.0                # Ctrl-C must get through on Windows
FOREVER = float("inf")

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
TYPE_LIST = b"+list\r\n"
TYPE_NONE = b"+none\r\n"
EMPTY_ARRAY = b"*0\r\n"
RESP2_NULL_BULK = b"$-1\r\n"
RESP2_NULL_ARRAY = b"*-1\r\n"
RESP3_NULL = b"_\r\n"
QUEUED = b"+QUEUED\r\n"


def _message_cost():
    """The bytes a queued message takes beyond its own, on this interpreter:
    the bytes object's header (sys.getsizeof of an empty one: 33 on 64-bit
    CPython, 17 on 32-bit), its slot in the deque and the deque's links
    (a pointer and a little), and half the allocator's rounding (objects
    are aligned to two pointers). PyPy has no getsizeof; its objects are
    about as large as 64-bit CPython's."""
    pointer = 8 if sys.maxsize > 2 ** 32 else 4
    try:
        header = sys.getsizeof(b"")
    except TypeError:
        header = 5 * pointer - 7
    return header + 2 * pointer


MESSAGE_COST = _message_cost()          # 49 on 64-bit CPython, 25 on 32-bit

# Redis's default pub/sub output limit: a subscriber whose unsent messages
# pass the hard limit, or stay past the soft limit for the time, is closed.
PUBSUB_HARD_LIMIT = 32 * 1024 * 1024
PUBSUB_SOFT_LIMIT = 8 * 1024 * 1024
PUBSUB_SOFT_SECONDS = 60

ERR_SYNTAX = "ERR syntax error"
ERR_NOT_INTEGER = "ERR value is not an integer or out of range"
ERR_NOT_POSITIVE = "ERR value is out of range, must be positive"
ERR_TIMEOUT_NOT_FLOAT = "ERR timeout is not a float or out of range"
ERR_TIMEOUT_NEGATIVE = "ERR timeout is negative"
ERR_TIMEOUT_RANGE = "ERR timeout is out of range"
ERR_MAX_CLIENTS = b"-ERR max number of clients reached\r\n"
ERR_OOM = "OOM command not allowed when used memory > 'maxmemory'."


# ## Errors ###################################################################

class BeussError(Exception):
    """Base of every error beuss raises on purpose."""


class ProtocolError(BeussError):
    """The peer sent bytes that are not the Redis protocol; the connection
    cannot be trusted to be in step any more and is closed."""


class ReplyError(BeussError):
    """A command was refused: the server answers it with an error reply and
    the connection goes on. The client raises it for an error reply."""


class ConnectionFailed(BeussError):
    """The server could not be reached, or the connection to it broke."""


class StoreError(ReplyError):
    """The store could not write a change: the command that made it is
    refused with -MISCONF, and nothing of it happens."""

    def __init__(self, reason):
        ReplyError.__init__(self, "MISCONF Errors writing to the store: %s; "
                            "commands that change queues are refused until "
                            "it works again" % reason)


def _warn(text):
    """Say something to the person at the terminal: one line on stderr."""
    sys.stderr.write("beuss: %s\n" % text)
    sys.stderr.flush()


# ## Helpers: what every part uses ###########################################


def _reason(exc):
    if isinstance(exc, socket.timeout):
        return "no answer in time"
    return exc.strerror or str(exc) or type(exc).__name__


def _number_text(seconds):
    """Seconds as text that reads back exactly (a float's shortest form,
    without a trailing ".0"): a delay sent to a script or shown by CONFIG
    GET is the one given, 1234567 never 1.23457e+06."""
    text = repr(float(seconds))
    return text[:-2] if text.endswith(".0") else text


def _duration_text(seconds):
    """Seconds as the shortest text _duration reads back: 1h, 90s, 1.5s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return "%d%s" % (seconds // size, unit)
    return _number_text(seconds) + "s"


def _size_text(number):
    """Bytes for people: 812 B, 13.4 KB, 1.0 MB (1024s)."""
    for unit in ("B", "KB", "MB", "GB"):
        if number < 1024 or unit == "GB":
            return ("%d %s" if unit == "B" else "%.1f %s") % (number, unit)
        number /= 1024.0


def _age_text(seconds):
    seconds = int(seconds)
    if seconds < 60:
        return "%ds" % seconds
    if seconds < 3600:
        return "%dm %02ds" % (seconds // 60, seconds % 60)
    return "%dh %02dm" % (seconds // 3600, seconds // 60 % 60)


def _plural(number, word, words=None):
    return "%g %s" % (number, word if number == 1 else words or word + "s")


def _same_token(given, token):
    # In constant time; hmac pulls in OpenSSL, so only a server with a
    # token imports it.
    import hmac
    return hmac.compare_digest(given, token)


def _name_text(name):
    """A queue or channel name for people: UTF-8, other bytes as \\xNN."""
    return name.decode("utf-8", "backslashreplace")


def _arg(value):
    """A command argument as bytes: str as UTF-8, numbers in decimal."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return repr(value).encode()
    raise TypeError("a message or queue name is bytes or str, not %s"
                    % type(value).__name__)


# ## Protocol: pure functions on bytes, shared by server and client ###########

def encode_bulk(data):
    return b"$%d\r\n%s\r\n" % (len(data), data)


def encode_int(number):
    return b":%d\r\n" % number


# The replies of small integers, as most integer replies are (a queue's
# length after a put, a count of deliveries): looking one up costs less
# than formatting it (see reserved_reply).
SMALL_INTEGERS = 1024
_INTEGER_REPLIES = [encode_int(number) for number in range(SMALL_INTEGERS)]


def encode_bulks(items):
    """An array of bulk strings: a request, or a reply such as LRANGE's."""
    parts = [b"*%d\r\n" % len(items)]
    for item in items:
        parts.append(b"$%d\r\n" % len(item))
        parts.append(item)
        parts.append(b"\r\n")
    return b"".join(parts)


def encode_error(text):
    # An error reply is one line: Redis turns line breaks into spaces.
    return b"-%s\r\n" % text.replace("\r", " ").replace("\n", " ").encode(
        "utf-8", "replace")


def encode_map(pairs, resp3):
    """pairs: (encoded key, encoded value). RESP2 has no map: a flat array."""
    head = b"%%%d\r\n" % len(pairs) if resp3 else b"*%d\r\n" % (2 * len(pairs))
    return head + b"".join(key + value for key, value in pairs)


def parse_integer(data):
    """Return the integer written in data as Redis's string2ll accepts it
    (optional minus, digits, no leading zero, 64 bits), else None."""
    digits = data[1:] if data[:1] == b"-" else data
    if not digits.isdigit() or len(digits) > 19:
        return None
    if digits[:1] == b"0" and len(data) > 1:
        return None
    number = int(data)
    return number if -2 ** 63 <= number < 2 ** 63 else None


def split_inline(line):
    """Split an inline request into arguments, with Redis's quoting rules:
    "double quotes" know \\n \\r \\t \\b \\a \\xHH and \\<char>, 'single
    quotes' know only \\', and a closing quote must end the argument."""
    if b'"' not in line and b"'" not in line:
        return line.split()
    args = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i:i + 1].isspace():
            i += 1
        if i == n:
            return args
        arg = bytearray()
        quote = None
        while True:
            if i == n:
                if quote:
                    raise ProtocolError("unbalanced quotes in request")
                break
            c = line[i:i + 1]
            if quote is None:
                if c.isspace():
                    break
                if c in (b'"', b"'"):
                    quote = c
                else:
                    arg += c
            elif c == b"\\" and quote == b'"' and line[i + 1:i + 2] == b"x" \
                    and _is_hex(line[i + 2:i + 4]):
                arg.append(int(line[i + 2:i + 4], 16))
                i += 3
            elif c == b"\\" and quote == b'"' and i + 1 < n:
                arg += _ESCAPES.get(line[i + 1:i + 2], line[i + 1:i + 2])
                i += 1
            elif c == b"\\" and quote == b"'" and line[i + 1:i + 2] == b"'":
                arg += b"'"
                i += 1
            elif c == quote:
                if i + 1 < n and not line[i + 1:i + 2].isspace():
                    raise ProtocolError("unbalanced quotes in request")
                i += 1
                break
            else:
                arg += c
            i += 1
        args.append(bytes(arg))


_ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"b": b"\b", b"a": b"\a"}


def _is_hex(two):
    return len(two) == 2 and all(c in b"0123456789abcdefABCDEF" for c in two)


# Length lines seen in almost every request ("*3", "$5"), looked up rather
# than parsed: parsing them is most of the cost of reading a request. Made
# by the first RequestReader, since only a server needs them.
_ARRAY_LENGTHS = {}
_BULK_LENGTHS = {}
_BULK_LINES = []                        # the length line of each length
_BULK_HEADS = []                        # ... with its CRLF, for replies
BATCH_WINDOW = 4096                     # bytes split at once into requests
BATCH_MINIMUM = 128                     # fewer are read one request at a time
REPEATED_MAXIMUM = 512                  # bytes of a request remembered


def _fill_length_tables():
    # Each table made whole, then put in place in one step (threads may
    # do this together), _BULK_LENGTHS last: it says they are there.
    _ARRAY_LENGTHS.update({b"*%d" % n: n for n in range(1024)})
    lines = [b"$%d" % n for n in range(4096)]
    _BULK_HEADS[:] = [line + b"\r\n" for line in lines]
    _BULK_LINES[:] = lines
    _BULK_LENGTHS.update({line: n for n, line in enumerate(lines)})


class RequestReader:
    """Turns the bytes a client sends into requests (lists of bytes).

    read() returns the next whole request, or None while it is incomplete:
    a request may be split at any byte and many may come in one read. It
    raises ProtocolError for bytes that break the protocol, and ReplyError
    for a request with an argument over both max_message and 64 KiB, after
    dropping that request's bytes as they come, so that the connection stays
    in step and nothing is buffered. Smaller arguments are read whole even
    past max_message, for commands whose arguments are not messages; the
    commands that take messages check the limit themselves.

    Bytes fed in are kept as a list of chunks and joined only once enough
    have arrived for the next step, so a large message arriving in many
    reads is copied a bounded number of times; small pieces behind them are
    gathered in one bytearray, so that a request sent a byte at a time costs
    about its size, not an object per byte.

    While `locked` (a client that has not authenticated yet), a request may
    have at most 10 arguments of at most 16 KiB each, as in Redis.

    Nearly every request is an array of short arguments with no CRLF inside
    them; when more than one may have arrived (BATCH_MINIMUM bytes), they
    are read many at a time (_read_batch): what arrived is split at CRLF
    once and each request's declared lengths are compared with its pieces
    in bulk. This reads a pipeline of small requests in about a third of
    the time that reading them one by one takes, but costs more than that
    for a single request. A pipeline that repeats one request byte for
    byte (a consumer's RESERVEs) is read with no split at all once a batch
    has seen it twice (_read_repeats). Anything else, or anything the
    comparison doubts, is read by _parse, one request at a time, with
    every check.
    """

    def __init__(self, max_message=DEFAULT_MAX_MESSAGE_SIZE):
        self.max_message = max_message
        self.locked = False
        self._max_argument = max(max_message, MAX_INLINE_LENGTH)
        # True when no argument of the request read last, nor of those
        # left in batch, passes max_message: so for a batch's (they lie in
        # BATCH_WINDOW bytes), whose messages the server need not measure.
        self.bounded = False
        self._batch_bounded = max_message >= BATCH_WINDOW
        self._buf = b""
        self._pos = 0
        self._chunks = []
        self._tail = bytearray()    # small pieces behind the chunks
        self._fed = 0               # bytes in chunks and tail
        self._partial = 0           # bytes of the arguments read so far
        self._arrived = 0           # bytes fed since the last incomplete read
        self._need = 1              # ... that make another read worth trying
        self._args = None           # arguments of the request under way
        self._left = 0              # arguments still to come
        self._bulk = -1             # length of the argument under way
        self._skip = 0              # bytes of an over-size argument to drop
        self._too_large = False     # the request under way is being dropped
        self._too_large_at = (0, [])  # (argument index, [command]) of it
        # Requests read ahead, the next one last: read() takes them, and so
        # does the server's loop, with pop(), to save a call a request.
        self.batch = []
        self._batch_bytes = 0       # the bytes they came in
        # Bytes before this are read one request at a time: a batch found
        # CRLF inside the first request's argument and read none, and would
        # find it again at each of the requests behind it.
        self._plain_until = 0
        # (bytes, arguments) of a request a batch found twice in a row, as
        # a consumer pipelines RESERVE: see _read_repeats.
        self._repeated = None
        if not _BULK_LENGTHS:
            _fill_length_tables()

    def feed(self, data):
        self._arrived += len(data)
        if not self._chunks and self._pos == len(self._buf):
            # Nothing unread (the usual case): the bytes become the buffer
            # as they are, with no join and no copy.
            self._buf, self._pos, self._plain_until = data, 0, 0
            return
        self._fed += len(data)
        if self._chunks and len(data) < SMALL_PIECE:
            self._tail += data
            return
        if self._tail:
            self._chunks.append(bytes(self._tail))
            self._tail = bytearray()
        self._chunks.append(data)

    def pending(self):
        """Bytes received and not yet handed out as part of a request: the
        request under way and anything behind it."""
        return (len(self._buf) - self._pos + self._fed + self._partial
                + (self._batch_bytes if self.batch else 0))

    def read(self):
        batch = self.batch
        if not batch:
            if self._chunks:
                if self._arrived < self._need:
                    return None
                self._chunks.insert(0, self._buf[self._pos:])
                if self._tail:
                    self._chunks.append(self._tail)
                    self._tail = bytearray()
                self._buf = b"".join(self._chunks)
                self._chunks = []
                self._fed = 0
                self._plain_until -= self._pos
                self._pos = 0
            elif self._pos == len(self._buf) and self._args is None \
                    and not self._too_large:
                # All read: what the read after each request finds, said
                # without _parse's setup (4% of a request's time unpipelined).
                self._buf, self._pos, self._arrived, self._need = b"", 0, 0, 1
                return None
            if len(self._buf) - self._pos < BATCH_MINIMUM or (
                    self._pos < self._plain_until or self._args is not None
                    or self._skip or self.locked or not self._read_batch()):
                self.bounded = False
                return self._parse()
            self.bounded = self._batch_bounded
        return batch.pop()

    def _read_batch(self):
        """Read ahead the whole simple requests at the start of the unread
        bytes into batch; return how many."""
        buf, pos = self._buf, self._pos
        if buf[pos] != 42:          # not b"*": an inline command, or junk
            return 0
        window = buf[pos:pos + BATCH_WINDOW]
        if self._repeated is not None and window.startswith(
                self._repeated[0]):
            return self._read_repeats(window)
        lines = window.split(b"\r\n")
        rest = lines.pop()          # what follows the last CRLF
        heads, n = _ARRAY_LENGTHS, len(lines)
        count = heads.get(lines[0]) if lines else None
        if not count:               # not "*N", or "*0": _parse knows
            return 0
        span = 2 * count + 1
        i = n - n % span            # the lines of whole requests, if alike
        if i and lines[0:i:span].count(lines[0]) == i // span:
            # Every request has as many arguments as the first, as in a
            # pipeline of one command: the heads are cut out at once, not
            # found one by one (a fifth less time reading a request).
            batch = [lines[k + 2:k + span:2] for k in range(0, i, span)]
            body = lines[:i]
            del body[::span]
        else:
            batch, body, i = [], [], 0
            while i < n:
                count = heads.get(lines[i])
                if not count:
                    break
                end = i + 1 + 2 * count
                if end > n:
                    break
                batch.append(lines[i + 2:end:2])
                body += lines[i + 1:end]
                i = end
        # The lines after the heads alternate: a declared length, then an
        # argument. An argument holding CRLF was split, so its first piece
        # is shorter than declared: then only the requests before it stand.
        # (The length lines are compared with those the pieces' lengths
        # would have, since looking them up would hash every one.)
        lengths, pieces = body[0::2], body[1::2]
        try:
            alike = lengths == list(map(_BULK_LINES.__getitem__,
                                        map(len, pieces)))
        except IndexError:          # a piece longer than the table
            alike = False
        if not alike:
            declared = list(map(_BULK_LENGTHS.get, lengths))
            good, first = 0, 0
            for args in batch:
                if declared[first:first + len(args)] != list(map(len, args)):
                    break
                good += 1
                first += len(args)
            del batch[good:]
            i = good + 2 * first
            if not good:
                self._plain_until = pos + len(window)
        elif len(batch) > 1 and batch[0] == batch[1]:
            # The first request again, its lengths checked: remembered.
            span = 2 * len(batch[0]) + 1
            size = sum(map(len, lines[:span])) + 2 * span
            if size <= REPEATED_MAXIMUM:
                self._repeated = (window[:size], batch[0])
        if i == n:                  # every whole line: most often so
            size = len(window) - len(rest)
        else:
            size = sum(map(len, lines[:i])) + 2 * i
        self._pos = pos + size
        self._batch_bytes = size
        batch.reverse()
        self.batch[:] = batch
        return len(batch)

    def _read_repeats(self, window):
        # The window starts with the remembered request, byte for byte, so
        # it is that request (a whole request is never the start of
        # another): the copies after it are counted, not split, and each
        # is handed out as the same list of arguments (no command changes
        # its arguments' list). A consumer's pipelined RESERVEs are read in
        # an eighth of the time a batch takes (PyPy: a tenth).
        request, args = self._repeated
        size = len(request)
        times = len(window) // size
        if window[:times * size] != request * times:
            times = 1
            while window.startswith(request, times * size):
                times += 1
        self._pos += times * size
        self._batch_bytes = times * size
        self.batch[:] = [args] * times
        return times

    def _parse(self):
        buf, pos, end = self._buf, self._pos, len(self._buf)
        args, left, bulk = self._args, self._left, self._bulk
        known_arrays, known_bulks = _ARRAY_LENGTHS, _BULK_LENGTHS
        max_argument = self._max_argument
        if self.locked:
            max_argument = min(max_argument, UNAUTHENTICATED_BULK)
        while True:
            if self._skip:
                dropped = min(self._skip, end - pos)
                pos += dropped
                self._skip -= dropped
                if self._skip:
                    return self._incomplete(pos, 1, args, left, bulk)
            if not left:
                if self._too_large:
                    self._too_large = False
                    self._pos = pos
                    self._args = None
                    self._left, self._bulk = 0, -1
                    self._partial = 0
                    index, command = self._too_large_at
                    error = message_too_large(self.max_message)
                    # Which argument, of which command: whether it is a
                    # message is the server's to say.
                    error.argument = index
                    error.command = command[0] if command else b""
                    error.limit = self._max_argument
                    raise error
                if pos == end:
                    return self._incomplete(pos, 1, None, 0, -1)
                if buf[pos] != 42:                  # not b"*": inline
                    newline = buf.find(b"\n", pos)
                    if newline < 0 or newline - pos > MAX_INLINE_LENGTH + 1:
                        if end - pos > MAX_INLINE_LENGTH:
                            raise ProtocolError("too big inline request")
                        return self._incomplete(pos, end - pos + 1, None, 0, -1)
                    args = split_inline(buf[pos:newline])
                    pos = newline + 1
                    if args:
                        self._pos = pos
                        return args
                    continue
                newline = buf.find(b"\r\n", pos)
                if newline < 0:
                    if end - pos > MAX_INLINE_LENGTH:
                        raise ProtocolError("too big mbulk count string")
                    return self._incomplete(pos, end - pos + 1, None, 0, -1)
                line = buf[pos:newline]
                left = known_arrays.get(line)
                if left is None:
                    left = parse_integer(line[1:])
                    if left is None or left > 2 ** 31 - 1:
                        raise ProtocolError("invalid multibulk length")
                if left > UNAUTHENTICATED_ARGUMENTS and self.locked:
                    raise ProtocolError("unauthenticated multibulk length")
                if left > MAX_ARGUMENTS:
                    raise ProtocolError("invalid multibulk length")
                pos = newline + 2
                if left <= 0:                       # Redis skips these
                    left = 0
                    continue
                args = []
            while left:
                if bulk < 0:
                    if pos == end:
                        return self._incomplete(pos, 1, args, left, bulk)
                    if buf[pos] != 36:              # not b"$"
                        raise ProtocolError("expected '$', got '%s'"
                                            % chr(buf[pos]))
                    newline = buf.find(b"\r\n", pos)
                    if newline < 0:
                        if end - pos > MAX_INLINE_LENGTH:
                            raise ProtocolError("too big bulk count string")
                        return self._incomplete(pos, end - pos + 1, args,
                                                left, bulk)
                    line = buf[pos:newline]
                    bulk = known_bulks.get(line)
                    if bulk is None:
                        bulk = parse_integer(line[1:])
                        if bulk is None or not 0 <= bulk <= MAX_BULK_LENGTH:
                            raise ProtocolError("invalid bulk length")
                    pos = newline + 2
                    if bulk > max_argument:
                        if self.locked and bulk > UNAUTHENTICATED_BULK:
                            raise ProtocolError("unauthenticated bulk length")
                        self._skip = bulk + 2
                        if not self._too_large:     # the first is the one
                            self._too_large_at = (len(args), args[:1])
                        self._too_large = True
                        bulk = -1
                        left -= 1
                        break
                stop = pos + bulk
                if stop + 2 > end:
                    return self._incomplete(pos, bulk + 2, args, left, bulk)
                if not self._too_large:     # else the request is dropped
                    args.append(buf[pos:stop])
                    self._partial += bulk
                pos = stop + 2
                bulk = -1
                left -= 1
            if self._skip or self._too_large:
                continue
            self._pos = pos
            self._args, self._left, self._bulk = None, 0, -1
            self._partial = 0
            return args

    def _incomplete(self, pos, need, args, left, bulk):
        # Keep what is not read yet, and the request under way; ask for
        # `need` bytes before parsing again.
        self._buf = self._buf[pos:]
        self._pos = 0
        self._arrived = len(self._buf)
        self._need = need
        self._args, self._left, self._bulk = args, left, bulk
        return None


def message_too_large(limit):
    return ReplyError("ERR message too large (max %d bytes)" % limit)


class ReplyReader:
    """Reads RESP2 and RESP3 replies from a blocking socket, for the client.
    Error replies come back as ReplyError instances, not raised, so a
    pipeline can read all of its replies before the first error is raised."""

    def __init__(self, sock):
        self._sock = sock
        self._buf = b""
        self._pos = 0

    def buffered(self):
        """Whether bytes of a next reply have been received already."""
        return self._pos < len(self._buf)

    def _fill(self):
        data = self._sock.recv(READ_SIZE)
        if not data:
            raise ConnectionError("the server closed the connection")
        self._buf = self._buf[self._pos:] + data
        self._pos = 0

    def _line(self):
        while True:
            newline = self._buf.find(b"\r\n", self._pos)
            if newline >= 0:
                line = self._buf[self._pos:newline]
                self._pos = newline + 2
                return line
            self._fill()

    def _exactly(self, length):
        while len(self._buf) - self._pos < length + 2:
            self._fill()
        data = self._buf[self._pos:self._pos + length]
        self._pos += length + 2
        return data

    def read(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b"+", b"#", b","):
            return rest.decode("utf-8", "replace") if kind == b"+" else rest
        if kind == b"-" or kind == b"!":
            text = rest if kind == b"-" else self._exactly(int(rest))
            return ReplyError(text.decode("utf-8", "replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$" or kind == b"=":
            length = int(rest)
            if length < 0:
                return None
            data = self._exactly(length)
            return data[4:] if kind == b"=" else data
        if kind in (b"*", b"~", b">"):
            count = int(rest)
            return None if count < 0 else [self.read() for _ in range(count)]
        if kind == b"%":
            pairs = [(self.read(), self.read()) for _ in range(int(rest))]
            return dict(pairs)
        if kind == b"_":
            return None
        raise ProtocolError("unexpected reply %r" % line[:40])


# ## Patterns: glob matching, as Redis's stringmatchlen ########################
#
# Names are matched against glob patterns (KEYS, SCAN MATCH, CONFIG GET,
# PSUBSCRIBE) as Redis's stringmatchlen matches them. The pattern is cut
# into tokens first: a star, or a test of one byte (a literal, `?`, a
# class). Matching then backtracks only to the last star seen, so it takes
# at most len(pattern) * len(name) steps, never the exponential time of a
# naive recursive matcher or of a translated regular expression.

_ANY_BYTE = (1 << 256) - 1


def compile_glob(pattern):
    """Tokens for glob_match: None for a star, else a 256-bit mask of the
    bytes that one position accepts."""
    tokens, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == 42:                                     # *
            if not tokens or tokens[-1] is not None:
                tokens.append(None)
        elif c == 63:                                   # ?
            tokens.append(_ANY_BYTE)
        elif c == 91:                                   # [
            i, mask = _glob_class(pattern, i + 1)
            tokens.append(mask)
        else:
            if c == 92 and i + 1 < n:                   # backslash escapes
                i += 1
            tokens.append(1 << pattern[i])
        i += 1
    return tokens


def _glob_class(pattern, i):
    """The mask of a [...] class whose body starts at i, and the index of
    its closing bracket (or of the pattern's last byte, unterminated)."""
    n = len(pattern)
    negate = i < n and pattern[i] == 94                 # ^
    if negate:
        i += 1
    mask = 0
    while i < n and pattern[i] != 93:                   # ]
        if pattern[i] == 92 and n - i >= 2:
            i += 1
            mask |= 1 << pattern[i]
        elif n - i >= 3 and pattern[i + 1] == 45:       # a-z
            # Redis compares C chars, signed on the platforms it runs on,
            # so a range is ordered with bytes over 127 as negative.
            low, high = sorted((_signed(pattern[i]), _signed(pattern[i + 2])))
            if low < 0:
                mask |= _byte_range(low + 256, min(high, -1) + 256)
            if high >= 0:
                mask |= _byte_range(max(low, 0), high)
            i += 2
        else:
            mask |= 1 << pattern[i]
        i += 1
    if i >= n:
        i = n - 1
    return i, (_ANY_BYTE ^ mask) if negate else mask


def _signed(byte):
    return byte - 256 if byte > 127 else byte


def _byte_range(low, high):
    """The mask of the bytes from low to high, both included."""
    return (1 << (high + 1)) - (1 << low)


def glob_match(tokens, name):
    """Whether name (bytes) matches the compiled pattern."""
    if not name:                    # stringmatchlen matches "" only to ""
        return not tokens
    t = s = 0
    star = -1                       # token index after the last star
    star_s = 0                      # where in name that star's match ends
    n_tokens, n = len(tokens), len(name)
    while s < n:
        if t < n_tokens:
            token = tokens[t]
            if token is None:
                star, star_s = t + 1, s
                t += 1
                continue
            if token >> name[s] & 1:
                t += 1
                s += 1
                continue
        if star < 0:
            return False
        star_s += 1                 # the star takes one byte more
        t, s = star, star_s
    while t < n_tokens and tokens[t] is None:
        t += 1
    return t == n_tokens


def glob_matcher(pattern):
    """A function name -> bool for the pattern (bytes). Most patterns are
    literal bytes and stars; those are matched with bytes methods, which
    find each piece between stars in C (a leftmost match of each piece is
    the right one). Others first look for their longest literal piece,
    which rejects most names before the general matcher runs."""
    tokens = compile_glob(pattern)
    pieces, piece = [], bytearray()
    for token in tokens + [None]:
        if token is None:
            pieces.append(bytes(piece))
            piece = bytearray()
        elif token and not token & (token - 1):     # one byte
            piece.append(token.bit_length() - 1)
        else:
            longest = max(pieces + [bytes(piece)], key=len)
            return lambda name: longest in name and glob_match(tokens, name)
    if None not in tokens:
        return pieces[0].__eq__
    first, last, middle = pieces[0], pieces[-1], pieces[1:-1]

    def match(name):
        if not name:                # stringmatchlen matches "" only to ""
            return False
        start, end = len(first), len(name) - len(last)
        if end < start or not (name.startswith(first)
                               and name.endswith(last)):
            return False
        for piece in middle:
            found = name.find(piece, start, end)
            if found < 0:
                return False
            start = found + len(piece)
        return True
    return match


# ## Queues: messages, waiters and holders, without sockets ####################

# A queue is a deque of messages (bytes) under a name (bytes), or once it
# is long a Packed, which acts as one (see below). It exists while it holds
# a message: the pop that empties it removes it, as Redis removes an empty
# list.
#
# A waiter is a client blocked in BLPOP, BRPOP, BLMPOP, BLMOVE, BRPOPLPUSH
# or RESERVE on one or more queues. It stands in the waiter line of each
# queue it names; the line is first come, first served, whatever the
# command. A push never hands a message over by itself: it marks the queue
# ready, and serve(), which the server calls once the command that pushed
# has finished, gives the heads of the ready queues to their oldest
# waiters. This is Redis's order: `RPUSH q a b c` with three waiters gives
# a, b and c to them in the order they came.
#
# A waiter leaves every line it stands in when it is served, when its
# timeout runs out and when its client goes away, all through cancel(); a
# message is taken from a queue only at the moment it is handed to a waiter
# that is still there, so a waiter that left loses nothing.
#
# A reserved message (RESERVE) leaves its queue but is not gone: it is held
# under a fresh id by its owner until ACK removes it for good. The owner
# going away puts it back at the head of its queue at once; a failure (NACK,
# the lease running out, the server's call) sets it aside first, for a wait
# that doubles with its deliveries (retry_delay up to retry_max_delay), or
# for NACK's own DELAY, after which it rejoins the head. One that was
# delivered max_deliveries times goes to the tail of "<queue>.dead" instead,
# as a dead letter that records why (a dead letter that fails again stays in
# its .dead queue, its count growing). A message that comes back keeps its
# count of deliveries; LLEN counts ready messages only. So a message is
# always in exactly one place: ready in one queue, held by one live client,
# or set aside until it is due (DEFER puts messages there too):
#
#                           RESERVE                  ACK
#     RPUSH ──► ready ────────────────────► held ───────────► gone
#                ▲ ▲                          │
#                │ └────── at once ───────────┤ its consumer went away,
#                │ when due                   │ NACK ... UNDELIVERED
#     DEFER ──► set aside ◄── after a wait ───┤ NACK, the lease ran out
#                                             │
#                          <queue>.dead ◄─────┘ at its last delivery
#
# DEL and FLUSHALL drop what is ready and set aside; held messages stay
# with their owners (acknowledged, gone; given back, they start the queue
# again). A paused queue (PAUSE) takes and sets aside as usual and
# delivers none until RESUME.
#
# With a store, each change is first handed to the journal, which writes it
# or raises StoreError; memory changes only after the journal took it.

class Waiter:
    """One blocked client: what it waits on, how it takes a message and
    how it is answered. The command that blocks says the last two, so
    nothing downstream asks what kind of wait this is."""

    __slots__ = ("names", "take", "reply", "owner", "active")

    def __init__(self, names, take=None, reply=None):
        self.names = names          # queues, in the order the client gave
        # take(queues, name): what the client gets from that queue, which
        # holds a message; reply(name, taken): the encoded answer.
        self.take = take or _take_head
        self.reply = reply
        self.owner = None           # the server's connection, opaque here
        self.active = True


def _take_head(queues, name):
    return queues.pop_one(name, True)


class Watch:
    """The queues one client watches (WATCH): `changed` turns true when any
    of them is changed by anyone, and stays so until the watch ends."""

    __slots__ = ("names", "changed")

    def __init__(self):
        self.names = set()
        self.changed = False


class Held:
    """A reserved message: out of its queue, held by its owner.

    Queues.reserve alone makes them, and sets every field itself: a call
    to an __init__ would cost about 750 instructions more a job."""

    __slots__ = (
        "id",               # bytes, unique for the life of the data
        "queue",
        "message",
        "deliveries",       # this delivery included
        "owner",
        "deadline",         # when the lease runs out (the server's), or None
        "died",             # a dead letter's (when, why) it died, or None
        "since")            # when it was reserved (monotonic)


_new_object = object.__new__


class Returned(bytes):
    """A message back in its queue unacknowledged: bytes that remember how
    many times they were delivered."""

    deliveries = 0


def _cost(messages):
    """The memory messages take in the process: their bytes, and for each
    its object header and its slot in the deque (measured: 33 + 8 bytes
    on 64-bit CPython, and the allocator rounds up)."""
    return sum(map(len, messages)) + MESSAGE_COST * len(messages)


def deliveries(message, dead=True):
    """How many times message was delivered; dead: it may be a dead letter
    (only queues named "<queue>.dead" hold them, so that other messages
    never cost a look in _RECORDS: on PyPy an id() costs memory)."""
    if message.__class__ is Returned:
        return message.deliveries
    if dead and _RECORDS:
        record = _RECORDS.get(id(message))
        if record is not None:
            return record[1]
    return 0


# A message in "<queue>.dead" remembers why it is there: the deliveries it
# had (tries), when it died (seconds since the epoch) and why. Reserved
# from there and given back, it comes back to the head of its .dead queue
# with its record, its deliveries counted on; moved by hand (LMOVE),
# redriven or removed, it leaves its record behind.
#
# The record is kept beside the message, not on it: a dead letter stays a
# plain bytes. A bytes subclass carrying attributes is an object CPython's
# garbage collector must visit, and a million expired messages made every
# full collection stop the loop for 150 ms and more (measured); plain
# bytes it never visits. _RECORDS maps a dead letter's id to (the letter,
# tries, died, why): the entry keeps the letter alive, so that id names no
# other object while the entry lasts, and Queues drops the entry whenever
# the letter leaves its queue or its place set aside (_unrecord). A letter
# is always a copy made for it: one bytes object may be queued in many
# places (the reader hands out one for every copy of a repeated request),
# and a record on it would name them all.
# Only queues named "<queue>.dead" hold dead letters (one moved elsewhere
# leaves its record behind), so only their messages are looked up.

_RECORDS = {}


class _Unique(bytes):
    """A copy of a message that is an object of its own: CPython shares
    the empty and the one-byte bytes, which cannot carry a record."""

    __slots__ = ()


def dead_letter(message, tries, died, why):
    # (bytes() of a bytes is the same object; of a view, a new one. On
    # PyPy a bytes' id is its value: there the copy is always a _Unique.)
    message = bytes(memoryview(message)) if len(message) > 1 and \
        sys.implementation.name != "pypy" else _Unique(message)
    _RECORDS[id(message)] = (message, tries, died, why)
    return message


def dead_record(message):
    """(tries, died, why) of a dead letter, or three Nones."""
    record = _RECORDS.get(id(message)) if _RECORDS else None
    return record[1:] if record is not None else (None, None, None)


def _unrecord(name, messages):
    """Messages leave their place in name: a dead letter's record goes."""
    if _RECORDS and name.endswith(b".dead"):
        for message in messages:
            _RECORDS.pop(id(message), None)


def dead_letters(name):
    """The queue where messages of `name` go after too many deliveries."""
    return name + b".dead"


class QueueCounts:
    """What happened to one queue: totals, samples and arrival marks."""

    __slots__ = ("pushed", "returned", "removed", "acknowledged",
                 "given_back", "dead_lettered", "expired", "marks", "marked",
                 "history", "active", "sampled_pushed")

    def __init__(self, second, depth=0):
        # What entered the queue: new messages (pushed), and messages that
        # came back to it (returned: given back, or there when counting
        # began); what left it other than to a consumer (removed: LREM,
        # LTRIM, DEL, FLUSHALL). What consumers took is then told by the
        # depth (delivered()), so a pop counts nothing.
        self.pushed, self.returned, self.removed = 0, depth, 0
        self.acknowledged = 0
        self.given_back = self.dead_lettered = self.expired = 0
        # Lists, not deques: an empty deque costs 600 bytes, and a client
        # that pushes to many names makes many of these.
        self.marks = []             # (pushed before, second)
        self.marked = None
        # (time, depth, pushed, delivered), one each SAMPLE_INTERVAL, four
        # floats a sample in one array: 2.9 KB for 15 minutes, where tuples
        # take 8 KB and give the collector 90 objects to visit each pass.
        self.history = array.array("d")
        self.active = second
        self.sampled_pushed = 0

    def samples(self):
        """The history as (time, depth, pushed, delivered), oldest first."""
        history = self.history
        return [tuple(history[at:at + 4]) for at in range(0, len(history), 4)]

    def delivered(self, depth):
        """Messages consumers took, the queue holding depth now."""
        return self.pushed + self.returned - self.removed - depth

    def rates(self, now, depth, span=60):
        """(in, out) per second over the last span seconds of samples."""
        history = self.history
        if not history:
            return 0.0, 0.0
        # From the newest back: a status page asks this of every queue.
        then, since = 0, now - span - SAMPLE_INTERVAL / 2
        for at in range(len(history) - 4, -1, -4):
            if history[at] < since:
                break
            then = at
        seconds = max(now - history[then], 1)
        return ((self.pushed - history[then + 2]) / seconds,
                (self.delivered(depth) - history[then + 3]) / seconds)


# A long queue keeps its middle packed. A Python bytes object costs 33 bytes
# beyond its own and its deque slot 8 more: for 100-byte messages, two
# fifths of their size. So once a queue holds more than PACK_FROM messages,
# those past its first run go, a run at a time, into one bytes object each
# with an array of where each message ends (four bytes a message), as
# Redis's listpacks keep a list. Its two ends stay message objects, where
# pushes and pops happen; a run is unpacked into messages again only when
# a pop reaches it or a change (LSET, LINSERT) lands in it. What it costs:
# each push on a packed queue is a method call more (a reserve takes from
# its head directly), and each message is copied into its run and out
# again: about 6 % more instructions a job in the job loop of `python
# test_beuss.py --bench --instructions` (its row "a packed queue", against
# the same load on a queue that does not pack; --bench has a row with all
# its 100,000 jobs queued first, where the queue packs). Below PACK_FROM that is not worth what packing saves (about 45
# bytes a message, 0.7 MB at most), so a shorter queue stays a deque; a
# packed one stays packed until it empties.
#
# Only plain bytes up to PACK_LONGEST pack: the bytes that remember their
# deliveries (Returned) stay objects, in a run kept as a list, and so do
# longer messages, whose header is a small part of their cost. Dead letters
# never pack (their identity keys their record, see _RECORDS). The memory
# Queues counts (size, --max-memory) follows: a packed message costs its
# bytes and its end, PACK_SAVES less than an object.

PACK_FROM = 16384               # messages in a queue before it packs
PACK_RUN = 1024                 # messages in one packed run
PACK_LONGEST = 1024             # bytes; a longer message stays an object
PACK_SAVES = MESSAGE_COST - 4


class _Run:
    """Messages packed in one bytes object, ends[i] where the i-th ends."""

    __slots__ = ("data", "ends")

    def __init__(self, messages):
        self.data = b"".join(messages)
        self.ends = array.array("I", itertools.accumulate(map(len, messages)))

    def __len__(self):
        return len(self.ends)

    def __getitem__(self, index):
        return self.data[self.ends[index - 1] if index else 0:self.ends[index]]

    def messages(self):
        # A loop of slices: half the time map(slice, ...) takes.
        data, start, found = self.data, 0, []
        for end in self.ends:
            found.append(data[start:end])
            start = end
        return found

    def __iter__(self):
        return iter(self.messages())

    def __reversed__(self):
        return reversed(self.messages())


def _pack(messages):
    """A run of messages: packed when each is a plain bytes short enough,
    else the list itself."""
    if set(map(type, messages)) == {bytes} and \
            max(map(len, messages)) <= PACK_LONGEST:
        return _Run(messages)
    return messages


class Packed:
    """A long queue: a deque's methods, as Queues uses them, over a head of
    messages, runs (packed, or lists), and a tail of messages. The head is
    never empty while the queue holds a message. A push is add(); a
    reserve takes from the head itself, then refill()s it."""

    __slots__ = ("head", "runs", "in_runs", "tail", "queues", "saving")

    def __init__(self, messages, queues):
        self.head = collections.deque(itertools.islice(messages, PACK_RUN))
        self.runs = collections.deque()
        self.in_runs = 0
        self.tail = []
        # What packing saves is taken off the size its Queues counts, and
        # given back as runs are unpacked (or, by Queues, as it goes).
        self.queues, self.saving = queues, 0
        self.add(itertools.islice(messages, PACK_RUN, None))

    def __len__(self):
        return len(self.head) + self.in_runs + len(self.tail)

    def __bool__(self):             # what a pop asks after each message
        return bool(self.head)

    def __iter__(self):
        return itertools.chain(self.head, itertools.chain.from_iterable(
            self.runs), self.tail)

    def __reversed__(self):
        return itertools.chain(reversed(self.tail), itertools.chain.from_iterable(
            map(reversed, reversed(self.runs))), reversed(self.head))

    def add(self, messages, left=False):
        """Queues' push, at the tail (or the head); the new length."""
        if left:
            self.head.extendleft(messages)
            return len(self.head) + self.in_runs + len(self.tail)
        tail = self.tail
        tail.extend(messages)
        while len(tail) >= 2 * PACK_RUN:
            run = _pack(tail[:PACK_RUN])
            del tail[:PACK_RUN]
            self.runs.append(run)
            self.in_runs += PACK_RUN
            if run.__class__ is _Run:
                self.saving += PACK_RUN * PACK_SAVES
                self.queues.size -= PACK_RUN * PACK_SAVES
        return len(self.head) + self.in_runs + len(tail)

    def _unpacked(self, run):
        """The messages of run as a list, each an object again."""
        if run.__class__ is not _Run:
            return run
        self.saving -= len(run) * PACK_SAVES
        self.queues.size += len(run) * PACK_SAVES
        return run.messages()

    def popleft(self):
        message = self.head.popleft()
        if not self.head:
            self.refill()
        return message

    def refill(self):
        """After the head's last message went: the next run, or else the
        tail, becomes the head; whether any message is left. (Queues'
        reserve pops the head itself and calls this.)"""
        head = self.head
        if self.runs:
            run = self.runs.popleft()
            self.in_runs -= len(run)
            head.extend(self._unpacked(run))
        else:
            head.extend(self.tail)
            self.tail = []
        return bool(head)

    def pop(self):
        if not self.tail and self.runs:
            run = self.runs.pop()
            self.in_runs -= len(run)
            self.tail = self._unpacked(run)
        return self.tail.pop() if self.tail else self.head.pop()

    def _locate(self, index, changing=False):
        """(the part holding index, its index there); changing, a packed
        run there is unpacked into a list first. index may be the length:
        the tail's end."""
        if index < 0:
            index += len(self)
        if not 0 <= index <= len(self):
            raise IndexError("queue index out of range")
        if index < len(self.head):
            return self.head, index
        index -= len(self.head)
        if index < self.in_runs:
            for number, run in enumerate(self.runs):
                if index < len(run):
                    if changing:
                        run = self.runs[number] = self._unpacked(run)
                    return run, index
                index -= len(run)
        return self.tail, index - self.in_runs

    def __getitem__(self, index):
        if index == 0:              # what RESERVE asks of every message
            return self.head[0]
        part, index = self._locate(index)
        return part[index]

    def __setitem__(self, index, message):
        part, index = self._locate(index, True)
        part[index] = message

    def insert(self, index, message):
        part, index = self._locate(index, True)
        part.insert(index, message)
        if part is not self.head and part is not self.tail:
            self.in_runs += 1

    def byte_count(self):
        """The bytes of its messages, without unpacking a run."""
        return sum(map(len, self.head)) + sum(
            len(run.data) if run.__class__ is _Run else sum(map(len, run))
            for run in self.runs) + sum(map(len, self.tail))

    def index(self, message):
        for index, item in enumerate(self):
            if item == message:
                return index
        raise ValueError("not in the queue")


class Queues:
    """Named FIFO queues of bytes, the clients waiting on them, and the
    messages clients hold."""

    def __init__(self, max_deliveries=0, journal=None, retry_delay=0.0,
                 retry_max_delay=0.0):
        self._queues = {}
        self._waiters = {}
        self.ready = {}             # an ordered set of names to serve
        self._watches = {}          # name -> {Watch: None}
        self._held_by = {}          # owner -> {id: Held}
        # Who holds what, by queue, for the consumers the status page shows:
        # queue -> {id: Held}, oldest first (ids grow), and queue -> {owner:
        # how many of its messages that owner holds}.
        self.holds = {}
        self.holders = {}
        # PAUSE: queues that take messages but deliver none until RESUME.
        self.paused = set()
        # QUEUE SET: queue -> {setting: value}, those not at their default;
        # queue -> (max-length, max-bytes, overflow) for the bounded ones,
        # and the bytes of the ready messages of those with a max-bytes.
        self.settings = {}
        self.bounded = {}
        self.weights = {}
        # PUT ... ID: queue -> {id: until when it is known}, oldest first.
        self.seen = {}
        # QUEUE SET rate: queue -> [seconds between two deliveries, when
        # the next may be] (see Rating).
        self.limited = {}
        # ttl: queue -> runs [until, count, ttl] of its last `covered`
        # messages, oldest first, and queue -> covered (see Expiring).
        self.expiring = {}
        self.covered = {}
        self.max_deliveries = max_deliveries    # 0: no limit
        self.retry_delay = retry_delay  # a first failure waits this long
        self.retry_max_delay = retry_max_delay  # and a later one at most
        # Messages set aside until they are due: a heap of (due, id, queue,
        # message, at the head), due in seconds since the epoch.
        self._deferred = []
        self.deferred_by = collections.Counter()    # queue -> how many
        self.counts = {}            # queue -> QueueCounts (see Counting)
        # The server's clock (time.monotonic()), read once a pass, and in
        # whole seconds: what reserves and counts in that pass are stamped
        # with, without a clock call a message.
        self.now = time.monotonic()
        self.second = int(self.now)
        self.journal = journal      # the store, or None
        self.next_id = 1            # of the next reservation
        self.size = 0               # memory all messages take, held too
        self.waiting = 0            # waiters not yet served or cancelled

    # Reading -------------------------------------------------------------

    def __len__(self):
        return len(self._queues)

    def __contains__(self, name):
        return name in self._queues

    def names(self):
        return list(self._queues)

    def length(self, name):
        queue = self._queues.get(name)
        return len(queue) if queue else 0

    def message_count(self):
        return sum(len(queue) for queue in self._queues.values())

    def held_count(self):
        return sum(map(len, self.holds.values()))

    def active_names(self):
        """Every queue with messages, waiters, held or deferred messages, a
        pause or settings of its own."""
        return list(dict.fromkeys(itertools.chain(
            self._queues, self._waiters, self.holds, self.paused,
            self.settings, self.deferred_by)))

    def sizes(self, name):
        """(messages, bytes, waiters, held, deferred) of one queue; the
        bytes are summed, so this costs a pass over its messages."""
        return (self.length(name), self._bytes(name),
                len(self._waiters.get(name, ())), len(self.holds.get(name, ())),
                self.deferred_by.get(name, 0))

    def _bytes(self, name):
        queue = self._queues.get(name, ())
        if queue.__class__ is Packed:
            return queue.byte_count()
        return sum(map(len, queue))

    def consumers(self, name, now):
        """(busy, oldest): how many consumers hold messages of name, and
        how long the oldest of those has been held (seconds, 0: none)."""
        holds = self.holds.get(name)
        if not holds:
            return 0, 0
        return len(self.holders[name]), max(now - next(iter(
            holds.values())).since, 0)

    def owners(self, name):
        """(those holding messages of name, those waiting on it, in line):
        the opaque owners, the server's connections."""
        return list(self.holders.get(name, ())), [
            waiter.owner for waiter in self._waiters.get(name, ())]

    def queue_sizes(self):
        """(name, messages, bytes, waiters, held, deferred) for each queue
        with messages, waiters, held or deferred messages."""
        return [(name,) + self.sizes(name) for name in self.active_names()]

    def peek(self, name, start, stop):
        """Messages from index start to stop, both included, as LRANGE
        counts them (negative from the tail)."""
        queue = self._queues.get(name)
        if not queue:
            return []
        length = len(queue)
        start = max(start + length if start < 0 else start, 0)
        stop = min(stop + length if stop < 0 else stop, length - 1)
        if start > stop:
            return []
        if start == 0 and stop == length - 1:
            return list(queue)
        # A deque reaches an index by walking its blocks from the nearer
        # end: islice walks once, from the end nearer the range.
        if start < length - 1 - stop:
            return list(itertools.islice(queue, start, stop + 1))
        found = list(itertools.islice(reversed(queue), length - 1 - stop,
                                      length - start))
        found.reverse()
        return found

    def index(self, name, index):
        """The message at index (negative from the tail), or None."""
        queue = self._queues.get(name)
        if not queue or not -len(queue) <= index < len(queue):
            return None
        return queue[index]

    def positions(self, name, message, rank=1, count=None, maxlen=0):
        """LPOS: indexes of message, from the rank-th match on (negative
        rank: counting from the tail), at most count of them (0: all),
        looking at no more than maxlen messages (0: all)."""
        queue = self._queues.get(name)
        if not queue:
            return []
        last = len(queue) - 1
        items = enumerate(queue if rank > 0 else reversed(queue))
        if maxlen:
            items = itertools.islice(items, maxlen)
        skip, found = abs(rank) - 1, []
        for i, item in items:
            if item == message:
                if skip:
                    skip -= 1
                    continue
                found.append(i if rank > 0 else last - i)
                if count is None or len(found) == count:
                    break
        return found

    def all_messages(self):
        """(name, messages) of every queue, in order."""
        return [(name, list(queue)) for name, queue in self._queues.items()]

    # Changing ------------------------------------------------------------
    #
    # Every change of a queue goes through _changed(), which ends the
    # watches on it: a transaction that watched it will not run.

    def _changed(self, name):
        watches = self._watches.get(name)
        if watches:
            for watch in watches:
                watch.changed = True

    def _weigh(self, name, change):
        if name in self.weights:
            self.weights[name] += change

    def _dropped(self, name, messages):
        """Messages that left name: their memory, bytes and records go
        (messages may be the whole queue, packed)."""
        self.size -= _cost(messages)
        if messages.__class__ is Packed:
            self.size += messages.saving
        self._weigh(name, -sum(map(len, messages)))
        _unrecord(name, messages)

    def push(self, name, messages, left=False, ttl=None):
        """Add messages at the tail (or the head); return the new length.
        A bounded queue refuses them (ReplyError FULL) or sends the excess
        to its dead letters, as its overflow setting says. At the tail they
        expire after ttl seconds, or the queue's ttl (see Expiring)."""
        if self.bounded and name in self.bounded:
            messages = self._within_bound(name, messages)
            if not messages:
                return self.length(name)
        if not left and (ttl or self.settings and name in self.settings):
            ttl = ttl or self.settings[name].get("ttl")
            if ttl:
                return self._push_expiring(name, messages, ttl)
        if self.journal is not None:
            self.journal.push(name, messages, left)
        counts = self.counts.get(name)
        if counts is not None and counts.marked == self.second:
            counts.pushed += len(messages)      # _arrived, without a call
        else:
            self._arrived(name, len(messages))
        queue = self._queues.get(name)
        if left or queue.__class__ is not collections.deque or \
                len(messages) != 1 or self.expiring or self.weights:
            return self._add(name, messages, left)
        # _add, written out for one message at the tail of a queue that
        # exists and is not packed: a producer's every request.
        queue.append(messages[0])
        self.size += len(messages[0]) + MESSAGE_COST
        if len(queue) > PACK_FROM:
            self._pack(name)
        if name in self._waiters:
            self.ready[name] = None
        if name in self._watches:
            self._changed(name)
        return len(queue)

    def _add(self, name, messages, left, until=FOREVER, ttl=None):
        if not left and (ttl or self.expiring and name in self.expiring):
            self._cover(name, len(messages), until, ttl)
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = collections.deque()
        if queue.__class__ is Packed:
            length = queue.add(messages, left)
        else:
            if left:
                queue.extendleft(messages)
            else:
                queue.extend(messages)
            length = len(queue)
            if length > PACK_FROM:
                self._pack(name)
        if len(messages) == 1:      # _cost, without a call for most pushes
            self.size += len(messages[0]) + MESSAGE_COST
        else:
            self.size += _cost(messages)
        if self.weights and name in self.weights:
            self.weights[name] += sum(map(len, messages))
        if name in self._waiters:
            self.ready[name] = None
        if name in self._watches:
            self._changed(name)
        return length

    def _pack(self, name):
        """A queue grown long packs its middle (see Packed); dead letters
        never pack."""
        if not name.endswith(b".dead"):
            self._queues[name] = Packed(self._queues[name], self)

    def pop_one(self, name, left=True):
        """Take the message at the head (or the tail), or None when there is
        none: pop() without its list, for the commands that take one."""
        if self.expiring and name in self.expiring and self.expire_head(name):
            return None
        queue = self._queues.get(name)
        if not queue or self.paused and name in self.paused or \
                self.limited and name in self.limited and not self._token(name):
            return None
        if self.journal is not None:
            self.journal.pop(name, 1, left)
        message = queue.popleft() if left else queue.pop()
        self.size -= len(message) + MESSAGE_COST
        if _RECORDS and name.endswith(b".dead"):
            _RECORDS.pop(id(message), None)
        if self.weights and name in self.weights:
            self.weights[name] -= len(message)
        if not queue:
            del self._queues[name]
        if name in self._watches:
            self._changed(name)
        return message

    def pop(self, name, left=True, count=1):
        """Take up to count messages from the head (or the tail)."""
        if self.expiring and name in self.expiring and self.expire_head(name):
            return []
        queue = self._queues.get(name)
        if not queue or count < 1 or self.paused and name in self.paused:
            return []               # nothing taken: nothing changed
        if self.limited and name in self.limited:
            if not self._token(name):
                return []
            count = 1
        count = min(count, len(queue))
        if self.journal is not None:
            self.journal.pop(name, count, left)
        return self._take(name, left, count)

    def _take(self, name, left, count):
        queue = self._queues[name]
        take = queue.popleft if left else queue.pop
        messages = [take() for _ in range(count)]
        self._dropped(name, messages)
        if not queue:
            del self._queues[name]
        if name in self._watches:
            self._changed(name)
        return messages

    def move(self, source, target, from_left=True, to_left=True,
             fresh=False):
        """Take one message from source and push it onto target; return it,
        or None when source is empty (or paused: LMOVE delivers; REDRIVE,
        fresh, does not). A dead letter leaves its record behind; fresh,
        the message also starts with no deliveries."""
        if not fresh and self.expiring and source in self.expiring and \
                self.expire_head(source):
            return None
        if not self._queues.get(source) or not fresh and (
                self.paused and source in self.paused or self.limited and
                source in self.limited and not self._token(source)):
            return None
        if self.journal is not None:
            self.journal.move(source, target, from_left, to_left, fresh)
        messages = self._take(source, from_left, 1)     # records left
        if fresh:
            messages = [bytes(messages[0])]
        self._arrived(target, 1)
        self._add(target, messages, to_left)
        return messages[0]

    def remove(self, name, count, message):
        """LREM: drop up to count copies of message from the head (count
        > 0), from the tail (count < 0), or all of them (0)."""
        queue = self._queues.get(name)
        if not queue:
            return 0
        limit = abs(count) or len(queue)
        found = []
        for i, item in enumerate(queue if count >= 0 else reversed(queue)):
            if item == message:
                found.append(i)
                if len(found) == limit:
                    break
        if not found:
            return 0
        if count < 0:
            last = len(queue) - 1
            found = [last - i for i in reversed(found)]
        if self.journal is not None:
            self.journal.remove(name, found)
        self._count(name, "removed", len(found))
        gone = set(found)
        self._dropped(name, [item for i, item in enumerate(queue) if i in gone])
        if queue.__class__ is Packed:       # the rest, objects again
            self.size += queue.saving
        kept = [item for i, item in enumerate(queue) if i not in gone]
        if kept:
            self._queues[name] = collections.deque(kept)
            if len(kept) > PACK_FROM:
                self._pack(name)
        else:
            del self._queues[name]
        self._changed(name)
        return len(found)

    def replace(self, name, index, message):
        """LSET: put message at index in place of the one there; False
        when the index is out of range."""
        queue = self._queues.get(name)
        if not queue or not -len(queue) <= index < len(queue):
            return False
        index %= len(queue)
        if self.journal is not None:
            self.journal.set(name, index, message)
        self.size += len(message) - len(queue[index])
        self._weigh(name, len(message) - len(queue[index]))
        _unrecord(name, [queue[index]])
        queue[index] = message
        self._changed(name)
        return True

    def insert(self, name, pivot, message, after):
        """LINSERT: put message before (or after) the first copy of pivot;
        return the new length, -1 without pivot, 0 without the queue."""
        queue = self._queues.get(name)
        if not queue:
            return 0
        try:
            index = queue.index(pivot) + (1 if after else 0)
        except ValueError:
            return -1
        if self.journal is not None:
            self.journal.insert(name, index, message, queue)
        self._arrived(name, 1)
        queue.insert(index, message)
        self.size += len(message) + MESSAGE_COST
        self._weigh(name, len(message))
        self._changed(name)
        return len(queue)

    def trim(self, name, start, stop):
        """LTRIM: keep the messages from start to stop, both included, as
        LRANGE counts them. Only what goes is touched, from both ends."""
        queue = self._queues.get(name)
        if queue is None:
            return
        length = len(queue)
        start = max(start + length if start < 0 else start, 0)
        stop = min(stop + length if stop < 0 else stop, length - 1)
        if start > stop:
            self.delete(name)
            return
        head, tail = start, length - 1 - stop
        if self.journal is not None and (head or tail):
            self.journal.trim(name, head, tail)
        self._count(name, "removed", head + tail)
        self._dropped(name, [queue.popleft() for _ in range(head)] + [
            queue.pop() for _ in range(tail)])
        self._changed(name)     # as Redis, even when nothing went

    def delete(self, name):
        """DEL: the queue and the messages set aside for it go for good;
        whether it held ready ones (what DEL counts, as Redis counts keys).
        Held messages stay with their owners: acknowledged, they are gone;
        given back, they start the queue again."""
        queue = self._queues.get(name)
        if self.deferred_by.get(name):
            self._drop_deferred(name)
        if queue is None:
            return False
        if self.journal is not None:
            self.journal.delete(name)
        self._count(name, "removed", len(queue))
        del self._queues[name]
        if name in self.expiring:
            del self.expiring[name], self.covered[name]
        self._dropped(name, queue)
        self._changed(name)
        return True

    def clear(self):
        """FLUSHALL: every queue goes, and every message set aside; held
        messages stay with their owners, as DEL leaves them."""
        if self._deferred:
            self._drop_deferred(None)
        if self.journal is not None:
            self.journal.clear()
        for name, queue in self._queues.items():
            self._changed(name)
            self._count(name, "removed", len(queue))
            self._dropped(name, queue)
        self._queues.clear()

    # Reserving -----------------------------------------------------------

    def reserve(self, name, owner):
        """Take the head of name and hold it for owner: a Held, or None
        when the queue is empty."""
        if self.expiring and name in self.expiring and self.expire_head(name):
            return None
        # _take(name, True, 1), written out: this is every job's path. A
        # held message counts in size as a queued one does, so size stays.
        # A packed queue's head is a deque (never empty), taken from
        # directly: Packed's methods would be three Python calls more a job.
        queue = self._queues.get(name)
        head = queue.head if queue.__class__ is Packed else queue
        if not head or self.paused and name in self.paused or \
                self.limited and name in self.limited and not self._token(name):
            return None
        held_id = b"%d" % self.next_id
        message = head[0]
        record = _RECORDS.get(id(message)) if _RECORDS and \
            name.endswith(b".dead") else None
        count = message.deliveries + 1 if message.__class__ is Returned \
            else 1 if record is None else record[1] + 1
        if self.journal is not None:
            self.journal.reserve(name, self.next_id, count)
        self.next_id += 1
        head.popleft()
        if not head and (head is queue or not queue.refill()):
            del self._queues[name]
        if record is not None:
            del _RECORDS[id(message)]
        if self.weights and name in self.weights:
            self.weights[name] -= len(message)
        if name in self._watches:
            self._changed(name)
        if message.__class__ is not bytes:
            message = bytes(message)
        held = _new_object(Held)    # see Held
        held.id = held_id
        held.queue = name
        held.message = message
        held.deliveries = count
        held.owner = owner
        held.deadline = None
        held.died = None if record is None else record[2:]
        held.since = self.now
        # (get, not setdefault: setdefault would make a dict every time.)
        mine, holds = self._held_by.get(owner), self.holds.get(name)
        if mine is None:
            mine = self._held_by[owner] = {}
        if holds is None:
            holds = self.holds[name] = {}
            self.holders[name] = {owner: 0}
        mine[held_id] = holds[held_id] = held
        holders = self.holders[name]
        if owner in holders:
            holders[owner] += 1
        else:
            holders[owner] = 1
        return held

    def held_by(self, owner, ids=None):
        """What owner holds: all of it, or the Helds of those ids, each
        once."""
        mine = self._held_by.get(owner)
        if not mine:
            return []
        if ids is None:
            return list(mine.values())
        # (filter(None, ...): a Held is always true.)
        return list(filter(None, map(mine.get, dict.fromkeys(ids))))

    def ack(self, helds):
        """Remove held messages for good."""
        if self.journal is not None and helds:
            self.journal.ack([held.id for held in helds])
        self._forget(helds)
        name = None
        for held in helds:
            if held.queue is not name:          # as in _forget
                name = held.queue
                counts = self.counts.get(name)
            if counts is not None:              # _count, written out
                counts.acknowledged += 1

    def give_back(self, helds, delay=None, why=None, failed=True,
                  now=None, undelivered=False):
        """Put held messages back, in the order they were queued. One at
        its last delivery goes to the tail of its dead letters, recording
        why (or that it failed too often); another goes back to the head of
        its queue after delay seconds, or when delay is None at once if it
        did not fail (its consumer went away) and else after the retry
        schedule's wait. undelivered: the consumer could not even start on
        them, so they go back at once, this delivery not counted. Returns
        the queues that dead letters went to."""
        now = time.time() if now is None else now
        dead = []
        for held in sorted(helds, key=lambda held: -int(held.id)):
            if not undelivered and self.is_dead(held.queue, held.deliveries):
                target = dead_letters(held.queue)
                record = (held.deliveries, now, why or "failed %d deliveries"
                          % held.deliveries)
                if self.journal is not None:
                    self.journal.unreserve(held.id, target, False, record)
                letter = dead_letter(held.message, *record)
                self._forget((held,))
                self._arrived(target, 1)
                self._add(target, [letter], False)
                dead.append(target)
                self._count(held.queue, "dead_lettered")
                if why == "lease expired":
                    self._count(held.queue, "expired")
                continue
            self._count(held.queue, "given_back")
            if why == "lease expired":
                self._count(held.queue, "expired")
            wait = 0 if undelivered else delay if delay is not None else (
                self.retry_wait(held.deliveries) if failed else 0)
            count = held.deliveries - 1 if undelivered else held.deliveries
            record = (None, None, None)
            if held.died is None:
                message = Returned(held.message)
                message.deliveries = count
            else:                   # a dead letter keeps its record
                record = (count,) + held.died
                message = dead_letter(held.message, *record)
            if wait > 0:
                deferred_id = self.next_id
                if self.journal is not None:
                    self.journal.defer_held(held.id, deferred_id, now + wait,
                                            record)
                self.next_id += 1
                self._forget((held,))
                self._set_aside(deferred_id, held.queue, message, now + wait,
                                True)
                continue
            if self.journal is not None:
                self.journal.unreserve(held.id, held.queue, True, record,
                                       count)
            self._forget((held,))
            self._count(held.queue, "returned")
            self._add(held.queue, [message] if count or record[0] is not None
                      else [bytes(message)], True)
        return dead

    def retry_wait(self, count):
        """Seconds a message waits after failing its count-th delivery:
        retry_delay, doubling each time, at most retry_max_delay."""
        if not self.retry_delay:
            return 0.0
        return min(self.retry_delay * 2.0 ** min(count - 1, 64),
                   self.retry_max_delay or float("inf"))

    def is_dead(self, name, count):
        """Whether a message of queue name delivered count times without
        an ACK is done with: a dead letter's own failures only count up,
        so there is no "<queue>.dead.dead"."""
        return bool(self.max_deliveries) and count >= self.max_deliveries \
            and not name.endswith(b".dead")

    def _forget(self, helds):
        # Their owner and message become None: a Held that is no longer
        # held says so to whoever still has it (a lease's entry), and keeps
        # no copy of the message there. One call for many: an ACK names a
        # hundred, one owner's, mostly of one queue (the same name object
        # when the RESERVEs were one request repeated), so the owner's and
        # the queue's tables are looked up again only when the owner or the
        # name changes. A table emptied is deleted: none after can be in it.
        held_by, holds_of, holders_of = self._held_by, self.holds, self.holders
        size = MESSAGE_COST * len(helds)
        owner = name = None
        for held in helds:
            size += len(held.message)
            held_id = held.id
            if held.owner is not owner:
                owner = held.owner
                mine = held_by[owner]
            if held.queue is not name:
                name = held.queue
                holds, holders = holds_of[name], holders_of[name]
            del mine[held_id]
            if not mine:
                del held_by[owner]
            del holds[held_id]
            if not holds:           # the queue's last: one holder, once
                del holds_of[name], holders_of[name]
            else:
                count = holders[owner] - 1
                if count:
                    holders[owner] = count
                else:
                    del holders[owner]
            held.owner = held.message = None
        self.size -= size

    # Counting ------------------------------------------------------------
    #
    # For the status page, metrics and TOP: each queue seen recently has a
    # QueueCounts: totals since it was first seen, a history of samples
    # (one each SAMPLE_INTERVAL, for HISTORY seconds), and marks of when
    # its messages arrived (at most one a second, MAX_MARKS of them), from
    # which the age of the oldest ready message is told, to the second, for
    # a queue used first in, first out. A push costs a dictionary lookup
    # and two additions. At most MAX_COUNTED queues are counted (the
    # others only in the totals of INFO), and a queue's counts go once it
    # has been empty and idle for HISTORY seconds.

    def _arrived(self, name, count):
        counts = self.counts.get(name)
        if counts is None:
            if len(self.counts) >= MAX_COUNTED:
                return
            counts = self.counts[name] = QueueCounts(self.second,
                                                     self.length(name))
        if counts.marked != self.second and len(counts.marks) < MAX_MARKS:
            counts.marks.append((counts.pushed, self.second))
            counts.marked = self.second
        counts.pushed += count

    def _count(self, name, field, count=1):
        counts = self.counts.get(name)
        if counts is not None:
            setattr(counts, field, getattr(counts, field) + count)

    def oldest_age(self, name, now):
        """Seconds the head of name has waited, as the marks tell, or 0."""
        counts = self.counts.get(name)
        if counts is None or not self._queues.get(name):
            return 0
        marks, delivered = counts.marks, counts.delivered(self.length(name))
        # A mark (pushed, when) says messages after the first `pushed`
        # arrived from `when` on; the head is about the delivered-th.
        passed = 0
        while passed + 1 < len(marks) and marks[passed + 1][0] <= delivered:
            passed += 1
        del marks[:passed]
        return max(now - marks[0][1], 0) if marks else 0

    def sample(self, now):
        """Record a sample of every counted queue, and forget the counts of
        queues empty and idle for HISTORY seconds."""
        for name, counts in list(self.counts.items()):
            depth = self.length(name)
            busy = depth or name in self.holds or name in self.deferred_by \
                or name in self._waiters
            if busy or counts.pushed != counts.sampled_pushed:
                counts.active = now
            elif now - counts.active > HISTORY:
                del self.counts[name]
                continue
            counts.sampled_pushed = counts.pushed
            history = counts.history
            history.extend((now, depth, counts.pushed,
                            counts.delivered(depth)))
            if len(history) > 4 * (HISTORY // SAMPLE_INTERVAL):
                del history[:4]

    # Deferring -----------------------------------------------------------
    #
    # A message set aside (DEFER, or a retry that waits) is in no queue
    # until it is due: then it joins the tail (DEFER) or the head (a retry)
    # of its queue, which wakes its waiters as a push does. It counts in
    # size meanwhile; DEL and FLUSHALL drop it with its queue.

    def _drop_deferred(self, name):
        """Drop the messages set aside for name (None: for every queue):
        one pass over all that are set aside, which only DEL and FLUSHALL
        of a queue that has some pay."""
        if self.journal is not None:
            self.journal.drop_deferred(name)
        kept = []
        for entry in self._deferred:
            if name is None or entry[2] == name:
                self.size -= len(entry[3]) + MESSAGE_COST
                _unrecord(entry[2], entry[3:4])
            else:
                kept.append(entry)
        heapq.heapify(kept)
        self._deferred = kept
        if name is None:
            self.deferred_by.clear()
        else:
            del self.deferred_by[name]

    def defer(self, name, messages, seconds, now=None):
        """DEFER: messages that join the tail of name in seconds. Returns
        how many of name's messages are now set aside."""
        bound = self.bounded and self.past_bound(
            name, len(messages), sum(map(len, messages)), deferred=True)
        if bound:
            raise self.full(name, bound)
        due = (time.time() if now is None else now) + seconds
        ids = list(range(self.next_id, self.next_id + len(messages)))
        if self.journal is not None:
            self.journal.defer(ids, name, messages, due)
        self.next_id += len(messages)
        for deferred_id, message in zip(ids, messages):
            self._set_aside(deferred_id, name, message, due, False)
        return self.deferred_by[name]

    def _set_aside(self, deferred_id, name, message, due, head):
        heapq.heappush(self._deferred, (due, deferred_id, name, message,
                                        head))
        self.deferred_by[name] += 1
        self.size += len(message) + MESSAGE_COST

    def next_due(self):
        """When the first message set aside is due, or None."""
        return self._deferred[0][0] if self._deferred else None

    def release_due(self, now=None, most=None):
        """Messages set aside whose time came join their queues, in the
        order they fall due, at most `most` of them (None: all); a store
        that fails leaves the rest for later (StoreError)."""
        now = time.time() if now is None else now
        deferred = self._deferred
        most = len(deferred) if most is None else most
        while deferred and deferred[0][0] <= now and most > 0:
            most -= 1
            due, deferred_id, name, message, head = deferred[0]
            if self.journal is not None:
                self.journal.undefer(deferred_id, name, head)
            heapq.heappop(deferred)
            self.deferred_by[name] -= 1
            if not self.deferred_by[name]:
                del self.deferred_by[name]
            self.size -= len(message) + MESSAGE_COST
            if head:
                self._count(name, "returned")   # a retry
            else:
                self._arrived(name, 1)          # DEFER's, arriving now
            self._add(name, [message], head)

    def deferred_count(self):
        return len(self._deferred)

    # Dead letters --------------------------------------------------------

    def dead_records(self, name, start=0, stop=-1):
        """WHY: (message, tries, died, why) for the messages of name from
        start to stop; a message that is not a dead letter has Nones."""
        return [(message,) + dead_record(message)
                for message in self.peek(name, start, stop)]

    def redrive(self, name, count=None):
        """Move up to count (None: all) messages from name's dead letters
        to the tail of name, as new messages; returns how many moved."""
        source, moved = dead_letters(name), 0
        while (count is None or moved < count) and self._queues.get(source):
            self.move(source, name, True, False, fresh=True)
            moved += 1
        return moved

    # Pausing -------------------------------------------------------------
    #
    # A paused queue takes messages as usual and delivers none: its pops
    # find it empty (LLEN and LRANGE still see what it holds), its waiters
    # wait, and its retries and deferred messages rejoin it. RESUME serves
    # its waiters again, oldest first. DEL and FLUSHALL leave the pause be:
    # it is the queue's setting, not a message.

    def pause(self, name, paused=True):
        """PAUSE (or RESUME, paused False); whether that changed it."""
        if (name in self.paused) == paused:
            return False
        if self.journal is not None:
            self.journal.pause(name, paused)
        if paused:
            self.paused.add(name)
        else:
            self.paused.discard(name)
            if name in self._waiters and name in self._queues:
                self.ready[name] = None
        return True

    # Bounding ------------------------------------------------------------
    #
    # A queue with a max-length (QUEUE SET) holds at most that many ready
    # messages once a push is done, one with a max-bytes at most that many
    # bytes of them (their own, summed as they come and go; a QUEUE SET
    # that gives it sums the queue once). Past a bound, overflow says what
    # happens: reject refuses the whole push (-FULL), drop-newest keeps the
    # longest start of the push that fits and sends the rest to the dead
    # letters, drop-oldest takes the push and sends as many messages from
    # the head (then the push's oldest) to the dead letters as it takes to
    # fit, each with the reason "overflow". A DEFER counts the messages set
    # aside too against max-length (its bytes against max-bytes) and is
    # refused when it would pass a rejecting bound; what comes back (given
    # back, due, redriven, moved) is never refused.

    def configure(self, name, settings, now=None):
        """QUEUE SET and RESET: name's settings become these (a dict of the
        settings not at their default; empty: all at their default). A
        shorter dedup-window shortens the ids known already."""
        window = settings.get("dedup-window", QUEUE_SETTINGS[
            "dedup-window"][0])
        last = (time.time() if now is None else now) + window
        seen = self.seen.get(name)
        if seen and max(seen.values()) > last:
            if self.journal is not None:
                self.journal.shorten_seen(name, last)
            for key, until in seen.items():
                seen[key] = min(until, last)
        if self.journal is not None:
            self.journal.configure(name, settings)
        self.settings.pop(name, None)
        self.bounded.pop(name, None)
        self.weights.pop(name, None)
        limit = self.limited.pop(name, [0, 0.0])
        if settings:
            self.settings[name] = dict(settings)
            if settings.get("max-length") or settings.get("max-bytes"):
                self.bounded[name] = (settings.get("max-length", 0),
                                      settings.get("max-bytes", 0),
                                      settings.get("overflow", "reject"))
            if settings.get("max-bytes"):
                self.weights[name] = self._bytes(name)
            if settings.get("rate", "0") != "0":
                self.limited[name] = [_rate_interval(settings["rate"]),
                                      limit[1]]

    def past_bound(self, name, count, size, deferred=False):
        """Which rejecting bound of name ("max-length" or "max-bytes") a
        push of count messages of size bytes would pass (deferred: counting
        those set aside), or None."""
        most, most_bytes, overflow = self.bounded.get(name, (0, 0, None))
        if overflow != "reject":
            return None
        if most and self.length(name) + count + (
                self.deferred_by.get(name, 0) if deferred else 0) > most:
            return "max-length"
        if most_bytes and self.weights[name] + size > most_bytes:
            return "max-bytes"
        return None

    def full(self, name, bound):
        held = "%d messages" % self.length(name) if bound == "max-length" \
            else "%d bytes" % self.weights[name]
        return ReplyError("FULL queue %s holds %s, its %s" % (
            _name_text(name), held, bound))

    def _within_bound(self, name, messages):
        """What of messages bounded name takes, the excess sent on."""
        most, most_bytes, overflow = self.bounded[name]
        count = self.length(name) + len(messages)
        size = self.weights.get(name, 0) + sum(map(len, messages))

        def over(count, size):
            return most and count > most or most_bytes and size > most_bytes
        if not over(count, size):
            return messages
        if overflow == "reject":
            raise self.full(name, self.past_bound(name, len(messages),
                                                  size - self.weights.get(name, 0)))
        dropped = []
        if overflow == "drop-oldest":    # older than the push, then its own
            drops = 0
            for message in itertools.chain(self._queues.get(name, ()),
                                           messages):
                if not over(count, size):
                    break
                count, size, drops = count - 1, size - len(message), drops + 1
            old = min(drops, self.length(name))
            if old:
                if self.journal is not None:
                    self.journal.pop(name, old, True)
                self._count(name, "removed", old)
                dropped = self._take(name, True, old)
            dropped += messages[:drops - old]
            messages = messages[drops - old:]
        else:                               # drop-newest
            kept = len(messages)
            while kept and over(count, size):
                kept -= 1
                count, size = count - 1, size - len(messages[kept])
            dropped, messages = messages[kept:], messages[:kept]
        self._count(name, "dead_lettered", len(dropped))
        died = time.time()
        self.push(dead_letters(name), [dead_letter(
            message, deliveries(message), died, "overflow")
            for message in dropped])
        return messages

    # Rating --------------------------------------------------------------
    #
    # A queue with a rate (QUEUE SET rate 10/s) delivers one message, to any
    # consumer, at most every 1/rate seconds: a pop, a RESERVE (COUNT n
    # gives one), LMOVE from it find it empty meanwhile, its waiters wait,
    # and the loop serves them when the next delivery may be (next_token),
    # with no polling. Pushes, LLEN and LRANGE are not limited.

    def _token(self, name):
        """Whether name may deliver now; if so, the next must wait."""
        limit, now = self.limited[name], time.time()
        if now < limit[1]:
            return False
        limit[1] = now + limit[0]
        return True

    def next_token(self):
        """When the first rate-limited queue with messages and waiters may
        deliver again, or None."""
        times = [limit[1] for name, limit in self.limited.items()
                 if name in self._waiters and self._queues.get(name)]
        return min(times) if times else None

    def wake_limited(self, now):
        """Mark ready the rate-limited queues whose next delivery may be."""
        for name, limit in self.limited.items():
            if limit[1] <= now and name in self._waiters and \
                    self._queues.get(name):
                self.ready[name] = None

    # Expiring ------------------------------------------------------------
    #
    # A message pushed at the tail of a queue with a ttl (QUEUE SET ttl 1h),
    # or with a ttl of its own (PUT ... TTL), that is still in the queue
    # when it runs out goes to the dead letters with the reason "expired
    # after 1h" instead of to a consumer. The queue keeps runs [until,
    # count, ttl], oldest first, of its last `covered` messages (pushes a
    # second apart with one ttl share a run, which ends with the later:
    # a message may outlive its ttl by less than a second, never fall
    # short of it). Messages in front of them (given back, pushed at the
    # head) do not expire; those joining the tail without a ttl get a run
    # that never ends, which keeps the runs in step (LINSERT into the
    # middle does not). Nothing else follows a message: what leaves the
    # queue from the head leaves covered > length, and the oldest runs are
    # cut to fit when next looked at. The head is looked at when a message
    # is taken, and at housekeeping; MOVE_SLICE at most expire at a time,
    # the rest in the next passes (a chore), so a million expiring
    # together never stop the loop.

    def _push_expiring(self, name, messages, ttl):
        until = time.time() + ttl
        if self.journal is not None:
            self.journal.push(name, messages, False, until, ttl)
        self._arrived(name, len(messages))
        return self._add(name, messages, False, until, ttl)

    def _cover(self, name, count, until, ttl):
        # A run for count messages joining the tail (until FOREVER, ttl
        # None: they do not expire, but keep the runs in step).
        self._fit_runs(name)
        runs = self.expiring.get(name)
        if runs is None:
            runs = self.expiring[name] = collections.deque()
            self.covered[name] = 0
        if runs and runs[-1][2] == ttl and until - runs[-1][0] < 1:
            runs[-1][0] = until
            runs[-1][1] += count
        else:
            runs.append([until, count, ttl])
        self.covered[name] += count

    def _fit_runs(self, name):
        """Cut the oldest runs until they cover no more than name holds."""
        runs, length = self.expiring.get(name), self.length(name)
        if runs is None:
            return
        excess = self.covered[name] - length
        while excess > 0:
            if runs[0][1] <= excess:
                excess -= runs.popleft()[1]
            else:
                runs[0][1] -= excess
                excess = 0
        self.covered[name] = min(self.covered[name], length)
        if not runs or len(runs) == 1 and runs[0][2] is None:
            del self.expiring[name], self.covered[name]

    def expire_head(self, name):
        """Send name's expired messages at its head to its dead letters,
        MOVE_SLICE at most; whether its head is still expired after."""
        return self._expire(name, time.time(), MOVE_SLICE) < 0

    def expire_due(self, now=None, most=MOVE_SLICE):
        """The same over every queue with a ttl, `most` in all; whether
        some are left to expire."""
        now = time.time() if now is None else now
        for name in list(self.expiring):
            most = self._expire(name, now, most)
            if most < 0:
                return True
        return False

    def _expire(self, name, now, most):
        # What is left of most, or -1 when the head is still expired.
        self._fit_runs(name)
        runs = self.expiring.get(name)
        while runs and self.covered[name] == self.length(name) and \
                runs[0][0] <= now:
            if most <= 0:
                return -1
            count = min(runs[0][1], most)
            if self.journal is not None:
                self.journal.pop(name, count, True)
            taken = self._take(name, True, count)
            ttl = runs[0][2]
            runs[0][1] -= count
            if not runs[0][1]:
                runs.popleft()
            self.covered[name] -= count
            most -= count
            self._count(name, "removed", count)
            self._count(name, "dead_lettered", count)
            self.push(dead_letters(name), [dead_letter(
                message, 0, now, "expired after " + _duration_text(ttl))
                for message in taken])
            if not runs or len(runs) == 1 and runs[0][2] is None:
                del self.expiring[name], self.covered[name]
                break
        return most

    # Putting once ----------------------------------------------------------
    #
    # PUT q message ID key adds message unless key was put on q within its
    # dedup-window (5 minutes): a producer that retries after a timeout
    # does not queue the job twice. The ids are kept in the order they were
    # put, which is the order their windows end (a window made shorter
    # shortens those known already), until their window has passed, then
    # forgotten at housekeeping, FORGET_SLICE at most; they count in size
    # (SEEN_COST and their bytes each). A push a bound refuses leaves no id
    # behind.

    def put_once(self, name, key, message, now=None, ttl=None):
        """PUT ... ID: name's new length, or 0 when key is known."""
        now = time.time() if now is None else now
        seen = self.seen.get(name)
        if seen and seen.get(key, 0) > now:
            return 0
        length = self.push(name, [message], ttl=ttl)
        window = self.settings.get(name, {}).get(
            "dedup-window", QUEUE_SETTINGS["dedup-window"][0])
        if self.journal is not None:
            self.journal.see(name, key, now + window)
        if seen is None:
            seen = self.seen[name] = {}
        elif key in seen:
            self.size -= len(key) + SEEN_COST
            del seen[key]                   # to the end: it is the newest
        seen[key] = now + window
        self.size += len(key) + SEEN_COST
        return length

    def forget_seen(self, now, most=FORGET_SLICE):
        """Forget, oldest first, at most most ids whose window passed."""
        if self.journal is not None:
            self.journal.forget_seen(now)
        for name in list(self.seen):
            seen, expired = self.seen[name], []
            for key, until in seen.items():
                if until > now or len(expired) >= most:
                    break
                expired.append(key)
            for key in expired:
                del seen[key]
                self.size -= len(key) + SEEN_COST
            if not seen:
                del self.seen[name]
            most -= len(expired)
            if most <= 0:
                return

    # Watching ------------------------------------------------------------

    def watch(self, watch, name):
        watch.names.add(name)
        self._watches.setdefault(name, {})[watch] = None

    def unwatch(self, watch):
        """End the watch on every queue; safe to call twice."""
        for name in watch.names:
            watches = self._watches.get(name)
            if watches is not None:
                watches.pop(watch, None)
                if not watches:
                    del self._watches[name]
        watch.names.clear()

    # Waiting -------------------------------------------------------------

    def takes_runs(self, name):
        """Whether pushes onto name, one after another, do what one push
        of all their messages does: nothing waits to take from it between
        them, and it has no bound that could refuse some of them."""
        return name not in self._waiters and name not in self.bounded

    def wait(self, waiter):
        for name in waiter.names:
            line = self._waiters.get(name)
            if line is None:
                line = self._waiters[name] = collections.deque()
            line.append(waiter)
        self.waiting += 1

    def cancel(self, waiter):
        """Take the waiter out of every line; safe to call twice."""
        if not waiter.active:
            return
        waiter.active = False
        self.waiting -= 1
        for name in waiter.names:
            line = self._waiters.get(name)
            if line is not None:
                try:
                    line.remove(waiter)
                except ValueError:
                    pass
                if not line:
                    del self._waiters[name]

    def serve(self):
        """Hand the heads of ready queues to their waiters, oldest first.
        Returns (waiter, name, taken) for each waiter served, taken being
        what its take() gave. A store that fails leaves the remaining
        waiters waiting."""
        served = []
        while self.ready:
            name = next(iter(self.ready))
            del self.ready[name]
            line = self._waiters.get(name)
            while line and not (name in self.expiring and self.expire_head(
                    name)) and name in self._queues and name not in self.paused \
                    and (name not in self.limited or self.limited[name][1] <=
                         time.time()):
                waiter = line[0]
                try:
                    message = waiter.take(self, name)
                except StoreError:
                    break
                self.cancel(waiter)
                served.append((waiter, name, message))
                line = self._waiters.get(name)
        return served


# ## Channels: who is subscribed to what, without sockets ######################

# Pub/sub channels are not queues: a published message goes at once to
# every client subscribed to its channel, then to every client whose
# pattern matches it, and is gone; with no subscriber it is dropped, as
# Redis drops it. Nothing is stored, so nothing here is ever lost or kept.
# A subscriber is an opaque owner (the server's connection); each keeps its
# channels and patterns in the order it subscribed, for UNSUBSCRIBE with no
# argument.
#
# Patterns are grouped by the bytes a channel must hold to match them: their
# literal start (what comes before the first *, ? or class), or for those
# that start with a wildcard their literal end, or else the longest literal
# run within (*17*). A PUBLISH looks up, for each length in use, the start,
# the end and every stretch of its channel, and runs only the matchers found
# there (and those of patterns with no literal at all, as *), in the order
# the patterns were first subscribed. Ten thousand patterns like news.17.*,
# *.17 or *17* cost a PUBLISH a few dozen look-ups, not ten thousand
# matchers.

class Channels:
    """Who is subscribed to which channel and pattern."""

    def __init__(self):
        self._channels = {}         # channel -> {owner: None}
        self._patterns = {}         # pattern -> (matcher, {owner: None}, order)
        self._owners = {}           # owner -> ({channel: None}, {pattern: None})
        self._groups = {}           # _pattern_key() -> {pattern: None}
        self._lengths = collections.Counter()   # (side, length) -> groups
        self._made = 0              # patterns made, for their order

    def subscriptions(self, owner):
        """(channels, patterns) of owner, each in the order subscribed."""
        channels, patterns = self._owners.get(owner, ({}, {}))
        return list(channels), list(patterns)

    def count(self, owner):
        channels, patterns = self._owners.get(owner, ({}, {}))
        return len(channels) + len(patterns)

    def subscribe(self, owner, channel, pattern=False):
        """Add a subscription; False when owner already had it."""
        mine = self._owners.setdefault(owner, ({}, {}))[pattern]
        if channel in mine:
            return False
        mine[channel] = None
        if pattern:
            entry = self._patterns.get(channel)
            if entry is None:
                self._made += 1
                entry = self._patterns[channel] = (glob_matcher(channel), {},
                                                   self._made)
                key = _pattern_key(channel)
                group = self._groups.get(key)
                if group is None:
                    group = self._groups[key] = {}
                    self._lengths[key[0], len(key[1])] += 1
                group[channel] = None
            entry[1][owner] = None
        else:
            self._channels.setdefault(channel, {})[owner] = None
        return True

    def unsubscribe(self, owner, channel, pattern=False):
        """Drop a subscription; False when owner did not have it."""
        mine = self._owners.get(owner)
        if mine is None or channel not in mine[pattern]:
            return False
        del mine[pattern][channel]
        if not mine[0] and not mine[1]:
            del self._owners[owner]
        table = self._patterns if pattern else self._channels
        owners = table[channel][1] if pattern else table[channel]
        del owners[owner]
        if not owners:
            del table[channel]
            if pattern:
                key = _pattern_key(channel)
                group = self._groups[key]
                del group[channel]
                if not group:
                    del self._groups[key]
                    length = key[0], len(key[1])
                    self._lengths[length] -= 1
                    if not self._lengths[length]:
                        del self._lengths[length]
        return True

    def receivers(self, channel):
        """(owner, pattern) for each delivery of a message published on
        channel: subscribers of the channel (pattern None), then those of
        each matching pattern."""
        found = [(owner, None) for owner in self._channels.get(channel, ())]
        if not self._patterns:
            return found
        candidates, size, groups = [], len(channel), self._groups
        for side, length in self._lengths:
            if length > size:
                continue
            if side == "within":        # each place the run could be
                for at in range(size - length + 1 if length else 1):
                    group = groups.get((side, channel[at:at + length]))
                    if group:
                        candidates.extend(group)
                continue
            group = groups.get((side, channel[:length] if side == "start"
                                else channel[size - length:]))
            if group:
                candidates.extend(group)
        candidates = list(dict.fromkeys(candidates))
        patterns = self._patterns
        if len(candidates) > 1:
            candidates.sort(key=lambda pattern: patterns[pattern][2])
        for pattern in candidates:
            match, owners, _ = patterns[pattern]
            if match(channel):
                found.extend((owner, pattern) for owner in owners)
        return found

    def channels(self, match=None):
        """Channels with at least one subscriber, those matching match."""
        return [name for name in self._channels if match is None
                or match(name)]

    def subscribers(self, channel):
        return len(self._channels.get(channel, ()))

    def pattern_count(self):
        return len(self._patterns)


def _pattern_key(pattern):
    """The group of a glob pattern: ("start", the bytes it must start
    with), or when there are none ("end", those it must end with), or else
    ("within", the longest run of bytes it must hold somewhere), b"" for a
    pattern with none (as *), which every channel tries. Read from its
    tokens, so classes and escapes are understood."""
    runs, run = [], bytearray()
    for token in compile_glob(pattern) + [None]:
        if not token or token & (token - 1):        # a star, a set, none
            runs.append(bytes(run))
            run = bytearray()
        else:
            run.append(token.bit_length() - 1)
    if runs[0]:
        return "start", runs[0]
    if runs[-1]:
        return "end", runs[-1]
    return "within", max(runs, key=len)


# ## Store: the queues on disk, in SQLite #####################################
#
# With --data, every queued and held message is also a row of an SQLite
# database (the standard library's sqlite3: crash-safe, needs no compaction,
# and any SQLite tool can read it). The queues call the store before each
# change; the store writes it in the transaction of the current loop pass,
# or raises StoreError, and then nothing of the change happens in memory.
# The server commits once a pass, before any reply of that pass is sent
# (group commit), so whatever a client was told is in the database. What
# survives depends on --fsync, as Redis's appendfsync:
#
#   always    each commit is synced before its replies go out: nothing
#             replied is lost, even when the power goes;
#   everysec  a helper thread syncs the files once a second: a killed
#             process loses nothing replied, a power cut about a second;
#   no        the operating system syncs when it likes.
#
# A failed commit (a full disk, an I/O error) keeps that pass's changes in
# memory and in a backlog that is committed again once a second, as Redis
# retries its AOF. The server holds back the replies of that pass, so no
# client hears of a change that is not in the file; we chose waiting over
# undoing, since memory cannot be rolled back cheaply and the replies are
# already made. Meanwhile commands that change queues are refused with
# -MISCONF, reads go on, and it all resumes by itself once the disk does;
# a stop while it fails counts the changes that were lost (never replied).
# The connection never waits for a lock (timeout 0): a file locked by
# another process refuses writes at once. Locks keep a second server away
# from the file whatever name it is given (_lock_store). At start the rows come back in their order; held
# messages go back to the head of their queue, delivery counts kept, or to
# their dead letters if they were at their last delivery.
#
# Messages set aside (DEFER, a retry that waits) are rows of their own with
# their due time as wall-clock seconds, so one whose time passed while the
# server was down is ready at start; a dead letter's record (deliveries,
# when, why) is part of its row.
#
# Schema (user_version 6; an older file is upgraded at start, a version at
# a time): queued(queue, position, message, deliveries, tries, died, why),
# ordered by position within a queue; held(id, queue, message, deliveries,
# tries, died, why); deferred(id, queue, message, deliveries, due, head,
# tries, died, why); settings(name, value) with next_id; paused(queue),
# the queues PAUSE stopped; configured(queue, settings), a queue's QUEUE SET
# as text ("max-length 100 overflow drop-oldest"); seen(queue, id, until),
# the ids of PUT ... ID and when their window ends; expiring(queue, position,
# until, ttl), when a queued message expires (rows of messages gone from
# the queue are deleted at housekeeping). tries, died and
# why are a dead letter's record, empty for other messages (a dead letter
# counts its deliveries in tries). A queue's name is TEXT where it is UTF-8
# (so `WHERE queue = 'jobs'` finds it), a BLOB where it is not.

_STORE_ID = 0x62657573          # "beus", PRAGMA application_id
_STORE_VERSION = 6              # PRAGMA user_version
_RECORD_COLUMNS = "tries INTEGER, died REAL, why TEXT"
_PAUSED_SCHEMA = "CREATE TABLE paused (queue PRIMARY KEY) WITHOUT ROWID;"
_CONFIGURED_SCHEMA = """CREATE TABLE configured (queue PRIMARY KEY,
    settings TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE seen (queue NOT NULL, id BLOB NOT NULL, until REAL NOT NULL,
                   PRIMARY KEY (queue, id)) WITHOUT ROWID;
CREATE INDEX seen_until ON seen (until);
CREATE TABLE expiring (queue NOT NULL, position REAL NOT NULL,
                       until REAL NOT NULL, ttl REAL NOT NULL,
                       PRIMARY KEY (queue, position)) WITHOUT ROWID;
CREATE INDEX expiring_until ON expiring (until);"""
_INSERT_QUEUED = "INSERT INTO queued VALUES (?, ?, ?, ?, ?, ?, ?)"
_STORE_SCHEMA = """
CREATE TABLE queued (queue BLOB NOT NULL, position REAL NOT NULL,
                     message BLOB NOT NULL, deliveries INTEGER NOT NULL,
                     %(record)s, PRIMARY KEY (queue, position)) WITHOUT ROWID;
CREATE TABLE held (id INTEGER PRIMARY KEY, queue BLOB NOT NULL,
                   message BLOB NOT NULL, deliveries INTEGER NOT NULL,
                   %(record)s);
CREATE TABLE settings (name TEXT PRIMARY KEY, value);
CREATE TABLE deferred (id INTEGER PRIMARY KEY, queue BLOB NOT NULL,
                       message BLOB NOT NULL, deliveries INTEGER NOT NULL,
                       due REAL NOT NULL, head INTEGER NOT NULL, %(record)s);
%(paused)s
%(configured)s""" % {"record": _RECORD_COLUMNS, "paused": _PAUSED_SCHEMA,
                     "configured": _CONFIGURED_SCHEMA}
# What each version adds to the one before: {version: its script}.
_STORE_UPGRADES = {
    2: "".join("ALTER TABLE queued ADD COLUMN %s;" % column for column
               in _RECORD_COLUMNS.split(", ")) + """
CREATE TABLE deferred (id INTEGER PRIMARY KEY, queue BLOB NOT NULL,
                       message BLOB NOT NULL, deliveries INTEGER NOT NULL,
                       due REAL NOT NULL, head INTEGER NOT NULL);""",
    3: "".join("ALTER TABLE %s ADD COLUMN %s;" % (table, column)
               for table in ("held", "deferred")
               for column in _RECORD_COLUMNS.split(", ")),
    4: lambda db: _names_as_text(db),
    5: _PAUSED_SCHEMA,
    6: _CONFIGURED_SCHEMA}


def _upgrade(db, version):
    """Bring a store from version to _STORE_VERSION, in one transaction."""
    db.execute("BEGIN")
    try:
        for number in range(version + 1, _STORE_VERSION + 1):
            step = _STORE_UPGRADES[number]
            if callable(step):
                step(db)
                continue
            for statement in step.split(";"):
                if statement.strip():
                    db.execute(statement)
        db.execute("PRAGMA user_version = %d" % _STORE_VERSION)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _names_as_text(db):
    """Version 4: every queue name that is UTF-8 becomes TEXT."""
    for table in ("queued", "held", "deferred"):
        for name, in db.execute("SELECT DISTINCT queue FROM %s WHERE "
                                "typeof(queue) = 'blob'" % table).fetchall():
            key = _name_key(name)
            if key.__class__ is str:
                db.execute("UPDATE %s SET queue = ? WHERE queue = ?" % table,
                           (key, name))


FSYNC_POLICIES = ("always", "everysec", "no")


# A pass's runs of like changes are written many rows a statement:
# pushes (a message without a record is a row of four columns), reserves
# (each copied to held by a join with rows of its id, deliveries and
# place) and acknowledgements (a DELETE of many ids). INSERT_ROWS rows a
# statement (400 parameters at most, under the 999 of older SQLites), then
# the rest in statements of 64, 32, ... 1 rows: a row costs a third to two
# thirds less so than alone, and SQLite keeps few texts prepared.
INSERT_ROWS = 100
_ROW_COUNTS = (INSERT_ROWS, 64, 32, 16, 8, 4, 2, 1)
_PUSH_ROWS = ("INSERT INTO queued (queue, position, message, deliveries) "
              "VALUES %s", "(?, ?, ?, ?)")
_RESERVE_ROWS = ("INSERT INTO held SELECT v.column1, q.queue, q.message, "
                 "v.column2, q.tries, q.died, q.why FROM (VALUES %s) AS v "
                 "JOIN queued AS q ON q.position = v.column3 AND q.queue = "
                 "v.column4", "(?, ?, ?, ?)")
_ACK_ROWS = ("DELETE FROM held WHERE id IN (%s)", "?")
_ROWS_SQL = {}                  # (statement, rows) -> its text


def _by_rows(items, statement):
    """The statements that write items, each a row's parameters (a tuple);
    a run of one row is one execute."""
    if len(items) == 1:
        return [(_rows_text(statement, 1), items[0])]
    statements, at = [], 0
    for rows in _ROW_COUNTS:
        chunks = []
        while len(items) - at >= rows:
            chunks.append(list(itertools.chain.from_iterable(
                items[at:at + rows])))
            at += rows
        if chunks:
            statements.append((_rows_text(statement, rows), chunks))
        if at == len(items):
            return statements


def _rows_text(statement, rows):
    text = _ROWS_SQL.get((statement, rows))
    if text is None:
        text = _ROWS_SQL[statement, rows] = statement[0] % ", ".join(
            [statement[1]] * rows)
    return text


def _blob(data):
    """bytes to bind in SQL. The sqlite3 module binds int, float, str and
    bytearray as they are, but looks for an adapter for anything else, bytes
    and None too; the failed look-up costs ten times the copy."""
    return bytearray(data)


def _name_key(name):
    """A queue's name as the store keeps it: TEXT when it is UTF-8, so that
    plain SQL finds it (WHERE queue = 'jobs'), else a BLOB. (Store.push and
    Store.reserve, on every job's path, decode an ASCII name themselves.)"""
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        return bytearray(name)


def _name_of(key):
    """A queue's name (bytes) from the store's TEXT or BLOB."""
    return key.encode("utf-8") if key.__class__ is str else key


def _run_statements(key, items):
    """The statements that write a run of like changes (Store._add)."""
    if key[0] == "push":
        if key[2]:                          # dead letters, with records
            return [(_INSERT_QUEUED, items)]
        return _by_rows(items, _PUSH_ROWS)
    if key[0] == "ack":
        # Ids are never named twice in a run: when they make one range, as
        # a consumer's batch mostly does, that range is deleted (without
        # the index SQLite builds for an IN list: half an ACK's cost).
        ids = [item[0] for item in items]
        first, last = min(ids), max(ids)
        if last - first + 1 == len(ids):
            return [("DELETE FROM held WHERE id BETWEEN ? AND ?", (first, last))]
        return _by_rows(items, _ACK_ROWS)
    if key[0] == "reserve":
        # Taken from the head one after another: the last one's position
        # bounds them all, and its id + 1 is the next id.
        last_id, _, position, queue = items[-1]
        return _by_rows(items, _RESERVE_ROWS) + [
            ("DELETE FROM queued WHERE queue = ? AND position <= ?",
             (queue, position)),
            ("INSERT OR REPLACE INTO settings VALUES ('next_id', ?)",
             (last_id + 1,))]
    # Pops: the run's last position bounds what it took from that end.
    return [("DELETE FROM queued WHERE queue = ? AND position %s ?" % (
        "<=" if key[2] else ">="), (_name_key(key[1]), items[-1]))]


class Store:
    """The journal of the queues in an SQLite file."""

    def __init__(self, path, fsync="everysec"):
        import sqlite3
        import threading
        self._sqlite3 = sqlite3
        self.path, self.fsync = path, fsync
        self.expiring_rows = False      # rows in expiring to look after
        self._forgot = (0.0, b"", 0.0)  # where forget_expiring stopped
        self._positions = {}        # queue -> deque of positions, in order
        self._backlog = []          # statements not yet committed
        self._pending = None        # (key, items): a run not yet written
        self._in_pass = False       # a transaction is open
        self.failing = None         # why the last commit failed, or None
        self.commits = 0
        self.last_commit = None     # when (time.time()) the last one was
        self.changes = 0            # changes made since the start
        self.saved = 0              # of those, how many are committed
        self._synced = 0            # commits the helper thread has synced
        self._sync_thread = None
        self._sync_files = []       # the helper's descriptors, closed last
        self._stop_sync = threading.Event()
        self._retry_at = 0.0        # when a failing store tries again
        self._degraded = False      # opened with no room for SQLite's index
        self._file_lock = None      # the file's own lock (_lock_file_itself)
        _check_writable(path)
        self._lock = _lock_store(path)
        try:
            try:
                self._db = self._open()
            except sqlite3.OperationalError as exc:
                if not os.path.exists(path) or not os.path.getsize(path):
                    raise
                # A full disk leaves no room for the index SQLite shares
                # beside the file: read it alone (exclusive locking keeps
                # that index in memory), refuse writes with MISCONF, and
                # open it as usual once a commit gets through (_reopen).
                self._db = self._open(exclusive=True)
                self._degraded = True
                self._start_failing(exc)
        except sqlite3.Error as exc:
            self._unlock()
            raise BeussError("cannot use %s: %s" % (path, _store_reason(exc)))
        except BaseException:
            self._unlock()
            raise

    def _open(self, exclusive=False):
        exists = os.path.exists(self.path)
        if exists and os.path.getsize(self.path) == 0:
            raise BeussError("cannot use %s: the file is empty, not a beuss "
                             "store (remove it to start a new one)" % self.path)
        # timeout=0: the loop never waits for another process's lock on the
        # file; a write that finds it locked is refused at once instead.
        db = self._sqlite3.connect(self.path, isolation_level=None,
                                   check_same_thread=False, timeout=0)
        try:
            if exclusive:
                db.execute("PRAGMA locking_mode = EXCLUSIVE")
            if exists:
                version = _first(db, "PRAGMA user_version")[0]
                if version < _STORE_VERSION and version + 1 in _STORE_UPGRADES:
                    _upgrade(db, version)
                _check_store(db, self.path)
            else:
                db.executescript(_STORE_SCHEMA)
                db.execute("PRAGMA application_id = %d" % _STORE_ID)
                db.execute("PRAGMA user_version = %d" % _STORE_VERSION)
            _first(db, "PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = %s" % (
                "FULL" if self.fsync == "always" else "OFF"))
            self._file_lock = _lock_file_itself(self.path)
        except BaseException:
            db.close()
            raise
        return db

    def _reopen(self):
        """After a start on a full disk, try to open the file as usual
        (which needs room for SQLite's index), so that other programs may
        read it while the server runs; whether that worked. Closing
        SQLite's descriptor drops the file's own lock: it is taken again,
        through a new descriptor."""
        self._db.close()
        if self._file_lock is not None:
            os.close(self._file_lock)
            self._file_lock = None
        try:
            self._db = self._open()
        except (self._sqlite3.Error, BeussError):
            self._db = self._open(exclusive=True)
            return False
        self._degraded = False
        return True

    def _unlock(self):
        for fd in (self._file_lock, self._lock):
            if fd is not None:
                os.close(fd)
        self._file_lock = self._lock = None

    def load(self, queues):
        """Fill queues (empty, with no journal) from the file: held
        messages first go back to the head of their queues, or to their
        dead letters when they had their last delivery."""
        try:
            self._load(queues)
        except BaseException as exc:
            self._db.close()
            self._unlock()
            if isinstance(exc, self._sqlite3.Error):
                raise BeussError("cannot use %s: %s" % (self.path,
                                                        _store_reason(exc)))
            raise
        if self.fsync == "everysec":
            import threading
            self._sync_thread = threading.Thread(
                target=self._sync_every_second, name="beuss-fsync",
                daemon=True)
            self._sync_thread.start()

    def _load(self, queues):
        # One transaction: held messages are put back first (statements
        # kept, in case the disk is full and the commit at the end fails:
        # then they are the backlog a later commit writes), then it all is
        # read, as it would be once they are written.
        db = self._db
        db.execute("BEGIN")
        fixes, edges = [], {}       # queue -> [lowest, highest] position
        for row in db.execute("SELECT id, queue, message, deliveries, tries, "
                              "died, why FROM held ORDER BY id DESC").fetchall():
            held_id, name, message, count, _, died, why = row
            row = (held_id, _name_of(name)) + row[2:]
            name = row[1]
            _check_row(self.path, "held", row, (int, bytes) + (
                _QUEUED_TYPES if why is None else _DEAD_LETTER_TYPES)[2:])
            record = (None, None, None)
            if why is not None:     # a dead letter, its deliveries counted on
                record = (count, died, why)
            head = not queues.is_dead(name, count)
            if not head:
                record = (count, time.time(), "held when the server stopped")
                name, count = dead_letters(name), 0
            if name not in edges:
                edges[name] = list(_first(db, "SELECT min(position), "
                                   "max(position) FROM queued WHERE queue = ?",
                                   (_name_key(name),)))
            edge = edges[name]
            if edge[0] is None:
                position = edge[0] = edge[1] = 0.0
            elif head:
                position = edge[0] = edge[0] - 1
            else:
                position = edge[1] = edge[1] + 1
            fixes.append((_INSERT_QUEUED, (_name_key(name), position, message,
                                           count) + record))
        if fixes:
            fixes.append(("DELETE FROM held", ()))
        for statement in fixes:
            self._execute(statement)
        for row in db.execute("SELECT queue FROM paused").fetchall():
            _check_row(self.path, "paused", (_name_of(row[0]),), (bytes,))
            queues.paused.add(_name_of(row[0]))
        for key, seen, until in db.execute(
                "SELECT * FROM seen WHERE until > ? ORDER BY until",
                (time.time(),)).fetchall():
            _check_row(self.path, "seen", (_name_of(key), seen, until),
                       (bytes, bytes, float))
            queues.seen.setdefault(_name_of(key), {})[bytes(seen)] = until
            queues.size += len(seen) + SEEN_COST
        for key, text in db.execute("SELECT * FROM configured").fetchall():
            try:
                queues.configure(_name_of(key), _queue_settings(
                    str(text).split()))
            except ReplyError as exc:
                raise BeussError("cannot use %s: it is damaged (the settings "
                                 "of %s: %s)" % (self.path, _name_text(
                                     _name_of(key)), str(exc)[4:]))
        row = _first(db, "SELECT value FROM settings WHERE name = 'next_id'")
        queues.next_id = row[0] if row else 1
        if queues.next_id.__class__ is not int:
            raise BeussError("cannot use %s: it is damaged (next_id is %r)"
                             % (self.path, queues.next_id))
        for row in db.execute("SELECT id, queue, message, deliveries, due, "
                              "head, tries, died, why FROM deferred").fetchall():
            row = row[:1] + (_name_of(row[1]),) + row[2:]
            _check_row(self.path, "deferred", row, (int, bytes, bytes, int,
                       float, int) + (_QUEUED_TYPES if row[-1] is None
                                      else _DEAD_LETTER_TYPES)[4:])
            deferred_id, queue, message, count, due, head, tries, died, why \
                = row
            if why is not None:
                message = dead_letter(message, tries, died, why)
            elif count:
                message = Returned(message)
                message.deliveries = count
            queues._set_aside(deferred_id, queue, message, due, bool(head))
            queues.next_id = max(queues.next_id, deferred_id + 1)
        name, messages, positions = None, [], collections.deque()
        for row in db.execute(
                "SELECT queue, position, message, deliveries, tries, died, "
                "why FROM queued ORDER BY queue, position"):
            queue, position, message, count, tries, died, why = row
            if queue.__class__ is str:
                queue = queue.encode("utf-8")
                row = (queue,) + row[1:]
            if message.__class__ is not bytes or count.__class__ is not int \
                    or queue.__class__ is not bytes \
                    or position.__class__ is not float or why is not None \
                    or tries is not None or died is not None:
                _check_row(self.path, "queued", row, _QUEUED_TYPES if why
                           is None else _DEAD_LETTER_TYPES)
            if queue != name:
                if messages:
                    queues._add(name, messages, False)
                name, messages = queue, []
                positions = self._positions[name] = collections.deque()
            if why is not None:
                message = dead_letter(message, tries, died, why)
            elif count:
                message = Returned(message)
                message.deliveries = count
            messages.append(message)
            positions.append(position)
        if messages:
            queues._add(name, messages, False)
        # The runs of what expires, from a queue's first such message to
        # its tail (messages without a ttl among them in never-ending runs),
        # once the rows of messages gone are.
        db.execute("DELETE FROM expiring WHERE NOT EXISTS (SELECT 1 FROM "
                   "queued WHERE queued.queue = expiring.queue AND "
                   "queued.position = expiring.position)")
        for key, until, ttl in db.execute(
                "SELECT queue, until, ttl FROM queued LEFT JOIN expiring "
                "USING (queue, position) WHERE position >= (SELECT "
                "min(position) FROM expiring WHERE expiring.queue = "
                "queued.queue) ORDER BY queue, position").fetchall():
            _check_row(self.path, "expiring", (_name_of(key), until, ttl),
                       (bytes, float, float) if until is not None else
                       (bytes, (float,), (float,)))
            queues._cover(_name_of(key), 1, FOREVER if until is None
                          else until, ttl)
        self.expiring_rows = _first(
            db, "SELECT 1 FROM expiring LIMIT 1") is not None
        queues.ready.clear()
        try:
            db.execute("COMMIT")
        except self._sqlite3.OperationalError as exc:
            self._backlog = fixes
            self._start_failing(exc)

    # What the queues call, before each change ----------------------------

    def push(self, name, messages, left, until=None, ttl=None):
        positions = self._positions.get(name)
        edge = (positions[0] if left else positions[-1]) if positions else 0.0
        key = name.decode() if name.isascii() else _name_key(name)
        if len(messages) == 1 and not (_RECORDS and name.endswith(b".dead")):
            # A job's put: its row without the loops and calls below (a
            # tenth of the instructions the store adds to a job), added to
            # the run under way without a call to _add (a twentieth).
            message = messages[0]
            new = (edge - 1.0 if left else edge + 1.0,)
            row = (key, new[0], bytearray(message), message.deliveries
                   if message.__class__ is Returned else 0)
            pending = self._pending
            if pending is not None and pending[0] == ("push", name, False):
                pending[1].append(row)  # _add, written out: the run goes on
                self.changes += 1
            else:
                self._add(("push", name, False), [row])
        else:
            new = self._push_rows(name, key, messages, edge, -1.0 if left
                                  else 1.0)
        if positions is None:
            positions = self._positions[name] = collections.deque()
        if left:
            positions.extendleft(new)
        else:
            positions.extend(new)
        if until is not None:
            rows = []           # (a loop: a comprehension costs cells)
            for position in new:
                rows.append((key, position, until, ttl))
            self._run([("INSERT INTO expiring VALUES (?, ?, ?, ?)", rows)])
            self.expiring_rows = True

    def _push_rows(self, name, key, messages, edge, step):
        # The rest of push (its comprehensions would make every push pay
        # for closures); returns the new positions.
        new = [edge + step * (i + 1) for i in range(len(messages))]
        if _RECORDS and name.endswith(b".dead") and any(
                id(message) in _RECORDS for message in messages):
            self._add(("push", name, True), [
                (key, position, message, deliveries(message))
                + dead_record(message)
                for position, message in zip(new, messages)])
        else:
            self._add(("push", name, False), [
                (key, position, _blob(message), deliveries(message, False))
                for position, message in zip(new, messages)])
        return new

    def forget_expiring(self, now):
        # The rows of messages gone from their queue (delivered, expired)
        # once their time has passed: MOVE_SLICE rows a housekeeping, from
        # where the last one stopped (the rest at the next start).
        rows = self._db.execute(
            "SELECT until, queue, position FROM expiring WHERE (until, queue, "
            "position) > (?, ?, ?) AND until <= ? ORDER BY until, queue, "
            "position LIMIT ?", self._forgot + (now, MOVE_SLICE)).fetchall()
        if rows:
            self._run([("DELETE FROM expiring WHERE queue = ? AND position "
                        "= ? AND NOT EXISTS (SELECT 1 FROM queued WHERE "
                        "queue = ? AND position = ?)", [
                            (queue, position) * 2 for _, queue, position
                            in rows])])
            self._forgot = rows[-1]

    def pop(self, name, count, left):
        positions = self._positions[name]
        # Positions grow from head to tail, so the first (or last) count
        # messages are those up to (or from) one position.
        self._add(("pop", name, left), [positions[count - 1] if left
                                        else positions[-count]])
        take = positions.popleft if left else positions.pop
        for _ in range(count):
            take()
        if not positions:
            del self._positions[name]

    def move(self, source, target, from_left, to_left, fresh=False):
        positions = self._positions[source]
        old = positions[0] if from_left else positions[-1]
        if source == target and len(positions) == 1:
            return                          # the one message stays put
        ends = self._positions.get(target)
        new = (ends[0] - 1 if to_left else ends[-1] + 1) if ends else 0.0
        self._run([
            # A record stays behind (its columns are left out), and fresh
            # also leaves the deliveries.
            ("INSERT INTO queued (queue, position, message, deliveries) "
             "SELECT ?, ?, message, %s FROM queued WHERE queue = ? AND "
             "position = ?" % ("0" if fresh else "deliveries"),
             (_name_key(target), new, _name_key(source), old)),
            ("DELETE FROM queued WHERE queue = ? AND position = ?",
             (_name_key(source), old))])
        positions.popleft() if from_left else positions.pop()
        if not positions:
            del self._positions[source]
        ends = self._positions.setdefault(target, collections.deque())
        ends.appendleft(new) if to_left else ends.append(new)

    def set(self, name, index, message):
        self._run([("UPDATE queued SET message = ?, deliveries = 0 WHERE "
                    "queue = ? AND position = ?",
                    (message, _name_key(name), self._positions[name][index]))])

    def insert(self, name, index, message, queue):
        positions = self._positions[name]
        before = positions[index - 1] if index else positions[0] - 2
        after = positions[index] if index < len(positions) else before + 2
        middle = (before + after) / 2
        if before < middle < after:
            self._run([(_INSERT_QUEUED, (_name_key(name), middle, message, 0,
                                         None, None, None))])
            positions.insert(index, middle)
            return
        # No room left between the two neighbours: number a stretch of the
        # queue around them afresh, twice as wide each time until its span
        # has room, so an insert rewrites a neighbourhood, never the queue.
        width = 16
        while True:
            low, high = max(index - width, 0), min(index + width,
                                                   len(positions))
            count = high - low + 1          # the stretch and the new one
            floor = positions[low - 1] if low else positions[0] - count
            ceiling = (positions[high] if high < len(positions)
                       else positions[-1] + count)
            step = (ceiling - floor) / (count + 1)
            new = [floor + step * (i + 1) for i in range(count)]
            if all(a < b for a, b in zip([floor] + new, new + [ceiling])):
                break
            width *= 2
        old = list(itertools.islice(queue, low, high))
        moved = old[:index - low] + [message] + old[index - low:]
        key = _name_key(name)
        statements = [(_INSERT_QUEUED,
                       [(key, position, item, deliveries(item))
                        + dead_record(item)
                        for position, item in zip(new, moved)])]
        if high > low:
            statements.insert(0, (
                "DELETE FROM queued WHERE queue = ? AND position >= ? AND "
                "position <= ?", (key, positions[low], positions[high - 1])))
        self._run(statements)
        positions.rotate(-low)
        for _ in range(high - low):
            positions.popleft()
        positions.extendleft(reversed(new))
        positions.rotate(low)

    def remove(self, name, indexes):
        """LREM: the messages at these indexes (in order) go."""
        positions = self._positions[name]
        gone, key = set(indexes), _name_key(name)
        removed = [(key, positions[i]) for i in indexes] if len(
            indexes) < 8 else [(key, position) for i, position
                               in enumerate(positions) if i in gone]
        self._run([("DELETE FROM queued WHERE queue = ? AND position = ?",
                    removed)])
        if len(removed) == len(positions):
            del self._positions[name]
        else:
            self._positions[name] = collections.deque(
                position for i, position in enumerate(positions)
                if i not in gone)

    def trim(self, name, head, tail):
        """LTRIM: head messages go from the head, tail from the tail."""
        positions, key = self._positions[name], _name_key(name)
        statements = []
        if head:
            statements.append(("DELETE FROM queued WHERE queue = ? AND "
                               "position <= ?", (key, positions[head - 1])))
        if tail:
            statements.append(("DELETE FROM queued WHERE queue = ? AND "
                               "position >= ?", (key, positions[-tail])))
        self._run(statements)
        for _ in range(head):
            positions.popleft()
        for _ in range(tail):
            positions.pop()

    def delete(self, name):
        self._run([("DELETE FROM queued WHERE queue = ?", (_name_key(name),))])
        del self._positions[name]

    def clear(self):
        self._run([("DELETE FROM queued", ())])
        self._positions.clear()

    def see(self, name, key, until):
        self._run([("INSERT OR REPLACE INTO seen VALUES (?, ?, ?)", (
            _name_key(name), _blob(key), until))])

    def forget_seen(self, now):
        self._run([("DELETE FROM seen WHERE until <= ?", (now,))])

    def shorten_seen(self, name, last):
        self._run([("UPDATE seen SET until = ? WHERE queue = ? AND until > ?",
                    (last, _name_key(name), last))])

    def configure(self, name, settings):
        self._run([("DELETE FROM configured WHERE queue = ?", (
            _name_key(name),))] + ([("INSERT INTO configured VALUES (?, ?)", (
                _name_key(name), _queue_settings_text(settings)))]
                if settings else []))

    def pause(self, name, paused):
        self._run([("INSERT OR IGNORE INTO paused VALUES (?)" if paused else
                    "DELETE FROM paused WHERE queue = ?", (_name_key(name),))])

    def drop_deferred(self, name):
        """The messages set aside for name (None: for every queue) go."""
        if name is None:
            self._run([("DELETE FROM deferred", ())])
        else:
            self._run([("DELETE FROM deferred WHERE queue = ?",
                        (_name_key(name),))])

    def reserve(self, name, held_id, count):
        positions = self._positions[name]
        row = (held_id, count, positions.popleft(),
               name.decode() if name.isascii() else _name_key(name))
        pending = self._pending
        if pending is not None and pending[0] == ("reserve", name):
            pending[1].append(row)      # as in push
            self.changes += 1
        else:
            self._add(("reserve", name), [row])
        if not positions:
            del self._positions[name]

    def ack(self, held_ids):
        self._add(("ack",), [(int(held_id),) for held_id in held_ids])

    def unreserve(self, held_id, name, to_head, record=(None, None, None),
                  deliveries=None):
        """A held message back at the head of name, its deliveries counted
        (or as many as given), or (a dead letter, with its record) at its
        tail with no deliveries counted; record is the dead letter's
        (tries, died, why), if it is one."""
        new = self._edge(name, to_head)
        count = "0" if not to_head else "deliveries" if deliveries is None \
            else "%d" % deliveries
        self._run([
            ("INSERT INTO queued SELECT ?, ?, message, %s, ?, ?, ? FROM held "
             "WHERE id = ?" % count,
             (_name_key(name), new) + tuple(record) + (int(held_id),)),
            ("DELETE FROM held WHERE id = ?", (int(held_id),))])
        self._place(name, new, to_head)

    def defer(self, ids, name, messages, due):
        self._run([
            ("INSERT INTO deferred (id, queue, message, deliveries, due, head) "
             "VALUES (?, ?, ?, 0, ?, 0)",
             [(deferred_id, _name_key(name), message, due)
              for deferred_id, message in zip(ids, messages)]),
            ("INSERT OR REPLACE INTO settings VALUES ('next_id', ?)",
             (ids[-1] + 1,))])

    def defer_held(self, held_id, deferred_id, due, record=(None, None, None)):
        """A held message set aside, to go back to the head when due
        (record: as unreserve's)."""
        self._run([
            ("INSERT INTO deferred SELECT ?, queue, message, deliveries, ?, "
             "1, ?, ?, ? FROM held WHERE id = ?",
             (deferred_id, due) + tuple(record) + (int(held_id),)),
            ("DELETE FROM held WHERE id = ?", (int(held_id),)),
            ("INSERT OR REPLACE INTO settings VALUES ('next_id', ?)",
             (deferred_id + 1,))])

    def undefer(self, deferred_id, name, head):
        new = self._edge(name, head)
        self._run([
            ("INSERT INTO queued SELECT queue, ?, message, deliveries, tries, "
             "died, why FROM deferred WHERE id = ?", (new, deferred_id)),
            ("DELETE FROM deferred WHERE id = ?", (deferred_id,))])
        self._place(name, new, head)

    def _edge(self, name, head):
        """The position of a message put at the head (or tail) of name."""
        positions = self._positions.get(name)
        if not positions:
            return 0.0
        return positions[0] - 1 if head else positions[-1] + 1

    def _place(self, name, position, head):
        # Once the statements ran: the new message's position, in order.
        positions = self._positions.setdefault(name, collections.deque())
        positions.appendleft(position) if head else positions.append(position)

    # Writing ---------------------------------------------------------------
    #
    # A pipelined pass brings runs of like changes: pushes to one queue,
    # pops from one end of it, acknowledgements. Such a run waits in
    # _pending and is written when something else comes, or at commit, in
    # as few statements as it can (pushes a hundred rows an INSERT, pops
    # one DELETE of a range of positions): SQLite's cost per statement is
    # paid once a run, not once a message. A pass's first change takes the
    # file's write lock (BEGIN IMMEDIATE), so that a file locked by another
    # process refuses it at once; once the pass holds the lock, what can
    # still fail (a full disk, an I/O error) fails when a run is written or
    # at the commit, and is handled as a failed commit is: the pass's
    # replies wait until it is written.

    def _add(self, key, items):
        """A change of a run (key: its kind, queue and end), items its rows
        or positions."""
        pending = self._pending
        if pending is not None and pending[0] == key:
            pending[1].extend(items)
        elif self.failing is not None:
            self._run(_run_statements(key, items))      # counts the change
            return
        elif not self._in_pass:
            try:
                self._begin()
            except self._sqlite3.Error as exc:
                raise StoreError(_store_reason(exc))
            self._pending = (key, items)
        else:
            self._flush()
            self._pending = (key, items)
        self.changes += 1

    def _begin(self):
        self._db.execute("BEGIN IMMEDIATE")
        self._in_pass = True

    def _flush(self):
        """Write the pending run; if that fails, the store starts failing
        with it in the backlog, as a failed commit does."""
        if self._pending is None:
            return
        statements = _run_statements(*self._pending)
        self._pending = None
        self._backlog.extend(statements)
        if self.failing is None:
            try:
                for statement in statements:
                    self._execute(statement)
            except self._sqlite3.Error as exc:
                self._start_failing(exc)

    def _execute(self, statement):
        sql, parameters = statement
        if isinstance(parameters, list):
            self._db.executemany(sql, parameters)
        else:
            self._db.execute(sql, parameters)

    def _run(self, statements):
        """Run the statements of one change, all or none of them."""
        self._flush()
        if self.failing is not None:
            # Only the server's own changes come here then (clients' are
            # refused): they wait in the backlog with the rest.
            self._backlog.extend(statements)
            self.changes += 1
            return
        db = self._db
        # One statement is all or nothing by itself; several need a
        # savepoint to be (SAVEPOINT and RELEASE cost a third of a push).
        several = len(statements) > 1
        try:
            if not self._in_pass:
                self._begin()
            if several:
                db.execute("SAVEPOINT change")
            for statement in statements:
                self._execute(statement)
            if several:
                db.execute("RELEASE change")
        except self._sqlite3.Error as exc:
            self._undo_change(several)
            raise StoreError(_store_reason(exc))
        self._backlog.extend(statements)
        self.changes += 1

    def _undo_change(self, several):
        # SQLite undoes the failed statement, and sometimes the whole
        # transaction: then the pass's earlier changes are written again.
        db = self._db
        try:
            if db.in_transaction:
                if several:
                    db.execute("ROLLBACK TO change")
                    db.execute("RELEASE change")
                return
            self._in_pass = False
            if self._backlog:
                self._replay()
        except self._sqlite3.Error as exc:
            self._fail(exc)

    def _replay(self):
        self._begin()
        for statement in self._backlog:
            self._execute(statement)

    def _start_failing(self, exc):
        if self.failing is None:
            _warn("cannot write %s: %s; replies that report changes wait "
                  "until it works again" % (self.path, _store_reason(exc)))
        self._fail(exc)

    def _fail(self, exc):
        self.failing = _store_reason(exc)
        self._in_pass = False
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except self._sqlite3.Error:
            pass

    def commit(self, now=False):
        """End the pass: its changes become durable (see --fsync), or the
        store starts failing. A failing store tries again every
        STORE_RETRY seconds, or now. Returns whether every change made so
        far is committed."""
        if self.failing is not None:
            clock = time.monotonic()
            if clock < self._retry_at and not now:
                return False
            self._retry_at = clock + STORE_RETRY
            if self._degraded and not self._reopen():
                return False
        self._flush()
        try:
            if self.failing is not None:
                self._replay()      # the backlog, once more
            if self._in_pass:
                self._db.execute("COMMIT")
                self.commits += 1
                self.last_commit = time.time()
        except self._sqlite3.Error as exc:
            self._start_failing(exc)
            return False
        if self.failing is not None:
            _warn("writing %s again" % self.path)
        self.failing = None
        self._in_pass = False
        self._backlog = []
        self.saved = self.changes
        return True

    def _sync_every_second(self):
        # fsync from a thread of its own, on descriptors opened here and
        # closed only after SQLite's (closing any descriptor of the file
        # would drop the locks SQLite holds on it).
        flags = os.O_RDWR | getattr(os, "O_BINARY", 0)
        files = self._sync_files
        while not self._stop_sync.wait(1.0):
            commits = self.commits
            if commits == self._synced:
                continue
            if len(files) < 2:
                for path in (self.path, self.path + "-wal")[len(files):]:
                    try:
                        files.append(os.open(path, flags))
                    except OSError:
                        break
            for fd in files:
                try:
                    os.fsync(fd)
                except OSError:
                    pass
            self._synced = commits

    def close(self):
        """Commit what is left, sync, and close. Returns how many changes
        could not be written (their clients were never told they were
        made)."""
        self.commit(now=True)
        unsaved = self.changes - self.saved
        self._stop_sync.set()
        if self._sync_thread is not None:
            self._sync_thread.join()
        try:
            self._db.execute("PRAGMA wal_checkpoint(FULL)")
        except self._sqlite3.Error:
            pass
        self._db.close()
        for fd in self._sync_files:
            os.close(fd)
        self._unlock()
        return unsaved


def _lock_store(path):
    """A descriptor holding a lock on "<the file's real path>-lock" for as
    long as it is open, so that two servers never share a file, even
    through a symbolic link (SQLite's own locks last a transaction, and its
    exclusive mode would shut out every reader)."""
    lock_path = os.path.realpath(path) + "-lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise BeussError("cannot use %s: cannot open %s: %s"
                         % (path, lock_path, _reason(exc)))
    try:
        if os.name == "nt":
            import msvcrt
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise BeussError("cannot use %s: another beuss server is using it "
                         "(%s is locked)" % (path, lock_path))
    return fd


# A byte of the store that no SQLite lock uses (its locks take the 512
# bytes from 1 GiB on): a record lock there is the file's own, whatever name
# it is opened by.
_STORE_LOCK_BYTE = 0x40000000 + 512


def _lock_file_itself(path):
    """Where POSIX record locks exist, also lock a byte of the file itself,
    so that a second server given a hard link (another name, the same file)
    is refused too. Such locks do not stop this process's own SQLite, and
    last until its last descriptor of the file closes, at the stop. (On
    Windows locks are mandatory and would stop SQLite's reads.) Returns
    the descriptor that holds the lock, or None."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _STORE_LOCK_BYTE)
    except OSError:
        os.close(fd)
        raise BeussError("cannot use %s: another beuss server is using it "
                         "(under another name)" % path)
    return fd


def _check_writable(path):
    """Say plainly when the store cannot be written: SQLite keeps its
    journal beside the file, so the folder must be writable too."""
    folder = os.path.dirname(os.path.abspath(path))
    for place, what in ((folder, "its folder %s" % folder), (path, "the file")):
        if os.path.exists(place) and not os.access(place, os.W_OK):
            raise BeussError("cannot use %s: %s is read-only (the store "
                             "writes there)" % (path, what))


def _check_row(path, table, row, types):
    """Refuse a row whose values are not of the types the store writes
    (a type, or None where the column may be empty)."""
    for value, kind in zip(row, types):
        if value.__class__ is not kind and not (
                value is None and kind.__class__ is tuple):
            raise BeussError("cannot use %s: it is damaged (a row of %s "
                             "holds %r where %s belongs)" % (
                                 path, table, value, "a " + kind.__name__
                                 if kind.__class__ is type else "nothing or a "
                                 + kind[0].__name__))


# The types of a queued row's columns: a plain message leaves the record's
# three empty (any of them may be), a dead letter fills all three.
_QUEUED_TYPES = (bytes, float, bytes, int, (int,), (float,), (str,))
_DEAD_LETTER_TYPES = (bytes, float, bytes, int, int, float, str)


_STORE_COLUMNS = {"queued": ["queue", "position", "message", "deliveries",
                             "tries", "died", "why"],
                  "held": ["id", "queue", "message", "deliveries", "tries",
                           "died", "why"],
                  "deferred": ["id", "queue", "message", "deliveries", "due",
                               "head", "tries", "died", "why"],
                  "settings": ["name", "value"], "paused": ["queue"],
                  "configured": ["queue", "settings"],
                  "seen": ["queue", "id", "until"],
                  "expiring": ["queue", "position", "until", "ttl"]}


def _check_store(db, path):
    """Refuse a file that is not a beuss store, or a damaged one."""
    sqlite3 = sys.modules["sqlite3"]
    try:
        application = _first(db, "PRAGMA application_id")[0]
        tables = {row[0] for row in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        raise BeussError("cannot use %s: it is not a beuss store (%s)"
                         % (path, exc))
    if application != _STORE_ID or not set(_STORE_COLUMNS) <= tables:
        raise BeussError("cannot use %s: it is another program's SQLite "
                         "database, not a beuss store" % path)
    for table, columns in _STORE_COLUMNS.items():
        found = [row[1] for row in db.execute("PRAGMA table_info(%s)" % table)]
        if found != columns:
            raise BeussError("cannot use %s: it is damaged (the table %s has "
                             "the columns %s)" % (path, table, ", ".join(found)))
    check = _first(db, "PRAGMA quick_check")[0]
    if check != "ok":
        raise BeussError("cannot use %s: it is damaged (%s)" % (path, check))


def _first(db, sql, parameters=()):
    """The first row of a query, or None, read to its end: PyPy finalizes
    a half-read statement late, and SQLite refuses COMMIT while one is open."""
    rows = db.execute(sql, parameters).fetchall()
    return rows[0] if rows else None


def _store_reason(exc):
    return str(exc) or type(exc).__name__


# ## Connections: sockets, their input and output, TLS, one close path ########

# A connection (_Conn) is one client's socket and all the server keeps for
# it: the bytes it sent and not yet run (its RequestReader), the replies
# not yet sent, and where it stands in a transaction, a wait or its
# subscriptions. _Connections is the half of the server that moves bytes;
# Server, the loop below, inherits it and runs what it reads.
#
# - _accept takes every connection waiting, up to --max-clients (those past
#   it get one error line and are closed); a TLS connection shakes hands
#   first, without blocking, and is closed if it stalls.
# - _read takes what the socket holds into the connection's reader, closes
#   a client that sends more than --max-input ahead, and runs the rest.
# - A reply goes to conn.out; _write sends at once what the socket takes
#   and keeps the rest as a memoryview, watching EVENT_WRITE only while
#   bytes wait. A client whose unsent replies pass OUTPUT_LIMIT is not read
#   or run until it reads. Replies held for the store (conn.held) wait for
#   a commit that succeeds.
# - _close is the one way out, and safe to call twice: it cancels the
#   client's wait, ends its watches and subscriptions, and gives back the
#   messages it held, so a client that goes away loses nobody a message.

class _Conn:
    """One client connection: its socket, what it sent, what it is owed."""

    __slots__ = ("sock", "id", "peer", "reader", "out", "unsent", "out_size",
                 "resp3", "name", "waiter", "closed", "closing", "writing",
                 "events", "handshaking", "authenticated", "failed_auths",
                 "backlogged",
                 "null_bulk", "null_array", "guarded", "multi", "multi_failed", "multi_size",
                 "in_exec", "watch", "subscribed", "over_soft_limit",
                 "created", "active", "command", "held", "pushed",
                 "library")

    def __init__(self, sock, conn_id, peer, max_message):
        self.sock = sock
        self.id = conn_id
        self.peer = peer            # the client's address, as accept() gave
        self.reader = RequestReader(max_message)
        self.out = []               # replies not yet handed to the socket
        self.unsent = None          # a memoryview the socket did not take
        self.out_size = 0           # bytes in out and unsent
        self.resp3 = False
        self.null_bulk = RESP2_NULL_BULK
        self.null_array = RESP2_NULL_ARRAY
        self.name = b""
        self.waiter = None
        self.closed = False
        self.closing = False        # close once the replies are sent
        self.writing = False        # replies wait for the socket
        self.events = 0             # what the selector watches for
        self.backlogged = False     # stopped running until replies drain
        self.handshaking = False    # TLS: the handshake is not over
        self.authenticated = True   # no token, or the client gave it
        self.failed_auths = 0
        # Requests of a connection in a transaction, or subscribed in RESP2,
        # take the slower path through Server._run_checked; others never do.
        self.guarded = False
        self.multi = None           # MULTI: the queued (Command, args)
        self.multi_failed = False   # a command was refused while queueing
        self.multi_size = 0         # bytes of arguments queued
        self.in_exec = False        # EXEC runs: blocking commands do not wait
        self.watch = None           # WATCH: a Watch, or None
        self.subscribed = False     # has a channel or pattern
        self.over_soft_limit = None  # since when a subscriber's backlog is
        self.created = self.active = time.monotonic()
        self.command = b"NULL"      # the last command, as CLIENT LIST shows
        self.held = False           # replies wait for the store (_commit)
        self.pushed = None          # messages it published to itself
        self.library = [b"", b""]   # CLIENT SETINFO LIB-NAME, LIB-VER


class _Connections:
    """Accepting, reading, writing and closing client connections, for
    Server, which inherits them and provides the rest: the selector,
    the listener, the settings, _run and the services _close calls."""

    def _accept_one(self, listener, full, refusal):
        """The next (socket, peer) waiting on listener, or None. One that
        comes when full() (its --max-clients or --max-http-clients), or
        past what select() can watch, gets the refusal and is closed.
        Out of descriptors, the
        listener, which stays readable, is no longer watched (watching it
        would spin) until housekeeping tries it again."""
        while True:
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._selector.unregister(listener)
                    self._paused.append(listener)
                    self._housekeeping_at = min(
                        self._housekeeping_at,
                        time.monotonic() + ACCEPT_RETRY)
                    self._complain("out of file descriptors (%s): not "
                                   "accepting connections for a moment"
                                   % _reason(exc))
                return None
            if full() or (self._max_fd is not None
                          and sock.fileno() >= self._max_fd):
                try:
                    sock.send(refusal)
                except OSError:
                    pass
                sock.close()
                continue
            return sock, peer

    def _accept(self):
        while True:
            accepted = self._accept_one(
                self._listener,
                lambda: len(self._conns) >= self.max_clients, ERR_MAX_CLIENTS)
            if accepted is None:
                return
            sock, peer = accepted
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False)
                except (OSError, ValueError):
                    sock.close()
                    continue
            conn = _Conn(sock, self._next_id, peer, self.max_message_size)
            self._next_id += 1
            self._conns[conn.id] = conn
            conn.handshaking = self._tls is not None
            if self.token is not None:
                conn.authenticated = False
                conn.reader.locked = True
            self._update_guard(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)
            conn.events = selectors.EVENT_READ

    def _listen_http(self, address):
        host, port = address
        try:
            self._http_listener = _listen(host or self.host, port)
        except OSError:
            self._close_all()
            raise
        self.http = self._http_listener.getsockname()[:2]
        self._selector.register(self._http_listener, selectors.EVENT_READ,
                                self._accept_http)

    def _accept_http(self):
        while True:
            accepted = self._accept_one(
                self._http_listener,
                lambda: len(self._http_conns) >= self.max_http_clients,
                HTTP_TOO_MANY)
            if accepted is None:
                return
            sock = accepted[0]
            sock.setblocking(False)
            conn = _HttpConn(self, sock)
            self._http_conns.add(conn)
            conn.watch(selectors.EVENT_READ)

    def _complain(self, text):
        # Hostile or broken traffic is said at most once a minute, so that
        # it cannot fill the log.
        now = time.monotonic()
        if now >= self._complained_at + 60:
            self._complained_at = now
            _warn(text)

    def _handshake(self, conn):
        import ssl
        try:
            conn.sock.do_handshake()
        except ssl.SSLWantReadError:
            self._set_events(conn, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            self._set_events(conn, selectors.EVENT_WRITE)
        except (OSError, ValueError):
            self._close(conn)
        else:
            conn.handshaking = False
            self._set_events(conn, selectors.EVENT_READ)
            self._read(conn)        # what came with the handshake

    def _read(self, conn):
        sock = conn.sock
        while True:
            try:
                # Into one buffer, then a copy of what came: recv() would
                # allocate READ_SIZE for every read, however small.
                size = sock.recv_into(self._read_buffer)
                data = self._read_view[:size].tobytes()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if conn.handshaking is False and _tls_wants(exc):
                    return          # TLS: the rest of a record is on its way
                self._close(conn)
                return
            if not data:
                self._close(conn)
                return
            conn.active = time.monotonic()
            conn.reader.feed(data)
            # TLS may hold decrypted bytes the socket no longer signals.
            if not (self._tls is not None and sock.pending()):
                break
        if conn.reader.pending() > self.max_input:
            self._reply(conn, encode_error(
                "ERR Protocol error: more than %d bytes of unread input"
                % self.max_input))
            conn.closing = True
            self._update_events(conn)
            return
        self._run(conn)
        self._update_events(conn)

    def _update_events(self, conn):
        """Read from conn only while it may send more: not while its
        replies pile up unread, nor while it waits with 64 KiB sent ahead
        (the kernel keeps the rest); write while replies wait unsent."""
        if conn.closed:
            return
        events = 0
        if conn.out_size <= OUTPUT_LIMIT and not (
                conn.waiter is not None
                and conn.reader.pending() >= WAITING_INPUT_LIMIT):
            events = selectors.EVENT_READ
        if conn.writing:
            events |= selectors.EVENT_WRITE
        if events != conn.events:
            self._set_events(conn, events)

    def _set_events(self, conn, events):
        if conn.events and events:
            self._selector.modify(conn.sock, events, conn)
        elif events:
            self._selector.register(conn.sock, events, conn)
        else:
            self._selector.unregister(conn.sock)
        conn.events = events

    def _reply(self, conn, data):
        if not conn.out and conn.unsent is None:
            self._dirty.append(conn)
        conn.out.append(data)
        conn.out_size += len(data)

    def _flush_dirty(self):
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            if conn.unsent is None and not conn.closed:
                self._write(conn)

    def _write(self, conn):
        out = conn.out
        while True:
            data = conn.unsent
            if data is None:
                if not out or conn.held:
                    break
                if conn.out_size <= WRITE_SLICE:    # all of it, most often
                    data = b"".join(out)
                    out.clear()
                else:
                    data = _next_slice(out)
            try:
                sent = conn.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                if not _tls_wants(exc):
                    self._close(conn)
                    return
                sent = 0
            conn.out_size -= sent
            if conn.backlogged and conn.out_size <= OUTPUT_LIMIT:
                conn.backlogged = False
                self._resumed.append(conn)  # caught up: run what it sent
            if sent < len(data):
                conn.unsent = memoryview(data)[sent:]   # sent without a copy
                if not conn.writing:
                    conn.writing = True
                    self._update_events(conn)
                return
            conn.unsent = None
        if conn.closing and not conn.held:
            self._close(conn)
            return
        if conn.writing or not conn.events & selectors.EVENT_READ:
            conn.writing = False
            self._update_events(conn)

    def _close(self, conn):
        if conn.closed:
            return
        conn.closed = True
        if conn.waiter is not None:
            self.queues.cancel(conn.waiter)
            conn.waiter = None
        self.unwatch(conn)
        self.unsubscribe_all(conn)
        held = self.queues.held_by(conn)
        if held:
            self._give_back_safely(held)
        self._conns.pop(conn.id, None)
        if conn.events:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.sock.close()

    def _close_all(self):
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns.values()):
            self._close(conn)
        if self.store is not None:
            # What the closes gave back, too.
            self.unsaved = self.store.close()
        for conn in list(self._http_conns):
            conn.close()
        if self._http_listener is not None:
            self._http_listener.close()
        self._selector.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()


def _tls_context(cert, key):
    """The server's TLS context, or a BeussError that says which file is
    wrong and how."""
    import ssl
    for path, what in ((cert, "certificate"), (key, "key")):
        if path is not None and not os.path.isfile(path):
            raise BeussError("cannot read the TLS %s %s: no such file"
                             % (what, path))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if key is None:
            raise BeussError("the TLS certificate %s holds no private key: "
                             "give its key with --tls-key" % cert)
        if _pem_holds(cert, b"PRIVATE KEY-----") and _pem_holds(
                key, b"-----BEGIN CERTIFICATE"):
            raise BeussError("the TLS certificate and key are the wrong way "
                             "round: %s holds a private key (give it to "
                             "--tls-key) and %s a certificate (--tls-cert)"
                             % (cert, key))
        raise BeussError("cannot use the TLS certificate %s with the key %s: "
                         "%s" % (cert, key, exc.reason or exc))
    except (OSError, ValueError) as exc:
        raise BeussError("cannot use the TLS certificate %s: %s"
                         % (cert, _reason(exc)))
    return context


def _pem_holds(path, marker):
    """Whether the PEM file at path holds marker in its first 64 KiB."""
    try:
        with open(path, "rb") as pem:
            return marker in pem.read(65536)
    except OSError:
        return False


def _next_slice(out):
    """Take the next replies from out, joined, at most about WRITE_SLICE
    bytes (a single larger reply whole): a backlog is never joined into
    one object."""
    if len(out) == 1:
        return out.pop()
    size, count = 0, 0
    for data in out:
        if count and size + len(data) > WRITE_SLICE:
            break
        size += len(data)
        count += 1
    data = b"".join(out[:count])
    del out[:count]
    return data


def _tls_wants(exc):
    """Whether exc only says that TLS needs the socket again later."""
    name = type(exc).__name__
    return name in ("SSLWantReadError", "SSLWantWriteError")


def _listen(host, port):
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        if sys.platform == "win32":
            # Windows lets a second server share a port with SO_REUSEADDR.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_EXCLUSIVEADDRUSE, 1)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(511)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _is_loopback(host):
    """Whether every address host names is a loopback one."""
    import ipaddress
    try:
        found = socket.getaddrinfo(host or None, 0, 0, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(
        address[4][0].split("%")[0]).is_loopback for address in found)


_OUT_OF_DESCRIPTORS = {getattr(errno, name) for name in (
    "EMFILE", "ENFILE", "ENOBUFS", "ENOMEM") if hasattr(errno, name)}


def _fit_to_descriptors(max_clients):
    """How many clients the process can really hold open. As Redis does,
    ask the system for enough file descriptors, and when it gives fewer,
    serve fewer clients: accept() failing for want of descriptors would
    leave the listener ready, and the loop spinning."""
    try:
        import resource
    except ImportError:             # Windows: select()'s limit is the bound
        return max_clients
    wanted = max_clients + RESERVED_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return max_clients
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    except (ValueError, OSError):   # macOS caps it below what hard says
        pass
    return max(min(max_clients, soft - RESERVED_DESCRIPTORS), 1)


def _address_text(address):
    """ip:port as Redis writes a client's address (IPv6 in brackets is not
    Redis's way: it writes the bare address, then :port)."""
    if not address:
        return "?"
    if isinstance(address, str):    # AF_UNIX
        return address + ":0"
    return "%s:%d" % (address[0], address[1])


def _local_address(sock):
    try:
        return sock.getsockname()
    except OSError:
        return None


def _drain(sock):
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


# ## Server: the loop (read, run, serve waiters, chores, commit, flush) ########

# One pass of the loop, in Server.serve_forever:
#
# 1. select() waits for sockets, at most until the next deadline (a
#    blocked client's timeout, a lease, housekeeping), so no timer thread
#    is needed. Each ready socket is written, then read; each read runs
#    the requests that came (_run), in order, up to REQUESTS_PER_PASS a
#    client, so one busy client cannot starve the others.
# 2. Running a request looks it up in the command table and enforces its
#    row (arity, then the flags: _run for most, _run_checked for a client
#    in a transaction, subscribed, not yet authenticated, or when the store
#    cannot write). After each command, queues it made ready are served
#    to their waiters, oldest first (_serve_waiters): a waiter's reply is
#    its own take() and reply(), set by the command that blocked.
# 3. Waits whose timeout passed are answered with a null; leases that ran
#    out give their messages back (or to <queue>.dead); messages set aside
#    whose time came rejoin their queues, MOVE_SLICE a pass.
# 4. One slice of one chore: work too long for a pass (the status page's
#    snapshot and answers, a large REDRIVE, a page action), done a slice a
#    pass, each in turn; while any waits, select() does not.
# 5. Clients that used their share, or were unblocked with requests
#    waiting behind, run again.
# 6. The store commits the pass's changes (_commit): replies that report a
#    change go out only once it is durable, and wait while it cannot be.
# 7. Replies are flushed (_flush_dirty), and once a second housekeeping
#    drops stalled handshakes, slow subscribers, stale lease entries and
#    HTTP clients that take nothing, and samples the queues for the page.
#
# Commands reach the server through its public methods (authenticate,
# begin_transaction, subscribe, publish, block, reserved, ...), never its
# private state.

def _rate(samples, now, count, span=60):
    """Per second over the last span seconds: samples are (time, count),
    oldest first, one each SAMPLE_INTERVAL; count is the count now."""
    then = (now, count)
    for sample in reversed(samples):
        if sample[0] < now - span - SAMPLE_INTERVAL / 2:
            break
        then = sample
    return (count - then[1]) / max(now - then[0], 1)


class _Expiry:
    """The chore that sends expired messages to their dead letters,
    MOVE_SLICE a pass, while any are left (see Expiring in Queues)."""

    def __init__(self, server):
        self.server = server

    def step(self):
        try:
            left = self.server.queues.expire_due()
        except StoreError:
            left = False            # the next housekeeping tries again
        if not left:
            self.server._expiry = None
        return not left


class _Errand:
    """A chore done for one client, who waits for its reply."""

    __slots__ = ("server", "conn", "work")

    def __init__(self, server, conn, work):
        self.server, self.conn, self.work = server, conn, work

    def step(self):
        try:
            reply = self.work()
        except ReplyError as exc:
            reply = encode_error(str(exc))
        if reply is None:
            return False
        if not self.conn.closed:
            self.server._reply(self.conn, reply)
            self.server._unblock(self.conn)
        return True


class Server(_Connections):
    """The bus: a non-blocking selectors loop serving one set of queues.

    Server(address, **settings): address is (host, port), port 0 picks a
    free port (.address tells which); the settings are keywords named as
    in the settings table (max_message_size=..., data=...), each defaulting
    as SERVE does. The constructor binds. serve_forever() runs the loop in
    the calling thread; start() runs it in a background thread; stop() ends
    it from anywhere and is safe to call twice.
    `with Server(("127.0.0.1", 0)) as server:` starts and stops it.
    """

    def __init__(self, address=(DEFAULT_HOST, DEFAULT_PORT), **settings):
        unknown = sorted(set(settings) - set(SERVER_SETTINGS))
        if unknown:
            raise TypeError("Server() has no setting %r" % unknown[0])
        settings = dict(SERVER_SETTINGS, **settings)
        vars(self).update(settings)     # self.lease, self.data, ... as given
        host, port = address[:2]
        token, max_clients = settings["token"], settings["max_clients"]
        self.selector = self.selector or selectors.DefaultSelector
        if token is not None and not isinstance(token, bytes):
            token = token.encode("utf-8")
        if token is None and self.protected_mode and not _is_loopback(host):
            raise BeussError(
                "refusing to listen on %s without a token: anyone who can "
                "reach it could read and delete every queue. Set one with "
                "--token, --token-file or BTOKEN, or pass --no-protected-mode "
                "to accept the risk" % (host or "every address"))
        self.token = token
        self.max_input = self.max_input or max(
            DEFAULT_MAX_INPUT, self.max_message_size + 1024 * 1024)
        if self.max_memory is None:     # 0: no bound
            self.max_memory = half_the_memory()
        self._memory_bound = self.max_memory or float("inf")    # for _run
        self._max_fd = None         # select(): descriptors must stay below
        if self.selector is getattr(selectors, "SelectSelector", None):
            if sys.platform == "win32":
                max_clients = min(max_clients, SELECT_SOCKETS - 4)
            else:
                self._max_fd = SELECT_SOCKETS * 2   # FD_SETSIZE, 1024
        # The status page's clients need descriptors too: what the system
        # gives is theirs first, the rest the RESP clients'.
        http_share = self.max_http_clients if settings["http"] else 0
        self.max_clients = max(_fit_to_descriptors(max_clients + http_share)
                               - http_share, 1)
        self._tls = None
        if self.tls_cert is not None:
            self._tls = _tls_context(self.tls_cert, self.tls_key)
        self.queues = Queues(self.max_deliveries, None, self.retry_delay,
                             self.retry_max_delay)
        self.store = None
        if self.data is not None:
            self.store = Store(self.data, self.fsync)
            self.store.load(self.queues)
            self.queues.journal = self.store
        self.channels = Channels()
        self.shard_channels = Channels()
        self.started = time.time()
        self._conns = {}
        self._next_id = 1
        self._deadlines = []        # heap of (deadline, sequence, waiter)
        self._leases = []           # heap of (deadline, sequence, Held)
        self._sequence = 0          # orders entries with equal deadlines
        self._resumed = collections.deque()  # unblocked, with input to run
        self._dirty = []            # connections with replies to send
        self._held_back = []        # connections whose replies wait (_commit)
        self._changes_seen = 0      # the store's count at the last commit
        self.unsaved = 0            # changes the store lost at the stop
        self._stopping = False
        self._serving = False
        self._closed = False
        self._thread = None
        self._read_buffer = bytearray(READ_SIZE)
        self._read_view = memoryview(self._read_buffer)
        self._paused = []           # listeners not watched for a moment
        # Work too long for one pass, done a slice a pass: each has step(),
        # which returns True once the work is done.
        self._chores = []
        self._expiry = None             # the _Expiry chore, while it runs
        self._snapshot = None           # the status page's latest numbers
        self.nonces = collections.deque(maxlen=600)   # the pages' last ones
        self.outcomes = {}              # the page's actions: id -> what
        self.next_outcome = 1
        self._housekeeping_at = time.monotonic() + HOUSEKEEPING_INTERVAL
        self._sample_at = 0.0           # the next sample of the queues
        self._started_clock = time.monotonic()
        self.published = {}             # channel -> messages published
        self.published_samples = {}     # channel -> [(time, published)]
        self.published_total = 0
        self.published_history = collections.deque(
            maxlen=HISTORY // SAMPLE_INTERVAL)  # (time, published_total)
        self._complained_at = -60.0
        self._selector = self.selector()
        http = self.http
        if http is not None and token is None and self.protected_mode \
                and not _is_loopback(http[0] or host):
            raise BeussError(
                "refusing to serve the status page on %s without a token: "
                "set one, or pass --no-protected-mode" % (http[0] or host))
        try:
            self._listener = _listen(host, port)
        except OSError:
            if self.store is not None:
                self.store.close()
            raise
        self.address = self._listener.getsockname()[:2]
        self.host, self.port = self.address
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ,
                                self._accept)
        self._selector.register(self._wake_r, selectors.EVENT_READ,
                                lambda: _drain(self._wake_r))
        self._http_conns = set()
        self._http_listener, self.http = None, None
        if http is not None:
            self._listen_http(http)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def start(self):
        # threading (and, before 3.8, the re it imports) only when a
        # thread is wanted: one-shot commands never need it.
        import threading
        self._thread = threading.Thread(target=self.serve_forever,
                                        name="beuss-server", daemon=True)
        self._thread.start()
        return self

    def stop(self):
        """End the loop and close every socket. From a signal handler in
        the loop's own thread, the loop ends when the handler returns."""
        import threading
        self._stopping = True
        self._wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        elif not self._serving:
            self._close_all()

    def settings(self):
        """(name, value) of what CONFIG GET shows, as bytes: what Redis
        tools ask of a Redis, then every row of the settings table as this
        server runs it (the token itself is never shown)."""
        shown = [("save", ""), ("appendonly", "yes" if self.store else "no"),
                 ("requirepass", "(set)" if self.token else "")]
        shown.extend((setting.config, _setting_text(getattr(self, setting.name)))
                     for setting in SETTINGS if setting.name != "token")
        return [(name.encode(), value.encode()) for name, value in shown]

    def info(self, sections=None):
        """The text of INFO: the named sections (bytes, lower case), or
        all of them."""
        queues = self.queues
        lines = []
        def section(title, fields):
            if sections is None or title.lower().encode() in sections:
                lines.append("# " + title)
                lines.extend("%s:%s" % field for field in fields)
                lines.append("")
        section("Server", [
            ("beuss_version", __version__),
            # The Redis whose replies beuss gives, for tools that check.
            ("redis_version", REDIS_VERSION),
            ("python_version", "%d.%d.%d" % sys.version_info[:3]),
            ("os", sys.platform),
            ("arch_bits", 64 if sys.maxsize > 2 ** 32 else 32),
            ("process_id", os.getpid()),
            ("tcp_port", self.address[1]),
            ("uptime_in_seconds", int(time.time() - self.started))])
        section("Clients", [
            ("connected_clients", len(self._conns)),
            ("blocked_clients", queues.waiting),
            ("maxclients", self.max_clients)])
        section("Memory", [
            ("used_memory", queues.size), ("maxmemory", self.max_memory),
            ("max_message_size", self.max_message_size)])
        store = self.store
        section("Persistence", [
            ("loading", 0), ("aof_enabled", int(store is not None)),
            ("store", store.path if store else ""),
            ("store_fsync", store.fsync if store else ""),
            ("store_commits", store.commits if store else 0),
            ("store_last_write_status",
             "err" if store and store.failing else "ok")])
        clock = time.monotonic()

        def rates(name):
            counts = queues.counts.get(name)
            return (",in_per_sec=%.2f,out_per_sec=%.2f,oldest_age=%d,busy=%d,"
                    "held_age=%d,paused=%d" % (
                        (counts.rates(clock, queues.length(name)) if counts
                         else (0.0, 0.0))
                        + (queues.oldest_age(name, clock),)
                        + queues.consumers(name, clock)
                        + (name in queues.paused,)) + "".join(
                            ",%s=%s" % (setting.replace("-", "_"), value)
                            for setting, value in queues.settings.get(
                                name, {}).items()))
        section("Queues", [("queues", len(queues)),
                           ("messages", queues.message_count()),
                           ("held", queues.held_count()),
                           ("deferred", queues.deferred_count())] + [
            ("queue_" + repr(name)[2:-1],
             "messages=%d,bytes=%d,waiters=%d,held=%d,deferred=%d"
             % tuple(sizes) + rates(name))
            for name, *sizes in queues.queue_sizes()])
        return "\r\n".join(lines)

    def status_head(self):
        """The status page's numbers that are not per queue or channel."""
        import platform
        queues, store, clock = self.queues, self.store, time.monotonic()
        return {
            "version": __version__, "host": self.host, "port": self.port,
            "python": "%d.%d.%d" % sys.version_info[:3],
            "implementation": platform.python_implementation(),
            "started": self.started,
            "uptime_seconds": int(time.time() - self.started),
            "memory_used_bytes": queues.size,
            "memory_max_bytes": self.max_memory,
            "connections": len(self._conns),
            "max_connections": self.max_clients,
            "http_connections": len(self._http_conns),
            "max_http_connections": self.max_http_clients,
            "store": store.path if store else None,
            "fsync": store.fsync if store else None,
            "store_ok": store is None or store.failing is None,
            "store_commits": store.commits if store else 0,
            "last_commit": store.last_commit if store else None,
            "tls": self._tls is not None, "token": self.token is not None,
            "published": self.published_total,
            "published_per_second": round(_rate(
                self.published_history, clock, self.published_total), 2)}

    def status(self):
        """What /status.json shows, made at once, with every queue and its
        history: for tests and programs that embed the server (the page
        makes its numbers a slice a pass instead)."""
        snapshot = _Snapshot(self)
        while not snapshot.step():
            pass
        return _status_document(snapshot, snapshot.rows, True)

    # Chores ----------------------------------------------------------------

    def add_chore(self, chore):
        self._chores.append(chore)

    def wait_for(self, conn, step):
        """Make conn wait while step() does a command's work a slice a
        pass, until it returns the reply; the command returns None."""
        waiter = Waiter([])
        waiter.active, waiter.owner = False, conn   # in no queue's line
        conn.waiter = waiter
        self.add_chore(_Errand(self, conn, step))
        return None

    def _do_chores(self):
        # One slice of one chore a pass, each in turn, so that a pass costs
        # one slice however many chores wait; a chore that fails costs
        # itself, never the bus.
        chore = self._chores.pop(0)
        try:
            done = chore.step()
        except Exception as exc:
            _warn("dropped a chore after an internal error: %r" % exc)
            done = True
        if not done:
            self._chores.append(chore)
        if self.queues.ready:
            self._serve_waiters()

    def snapshot(self):
        """The status page's numbers: the latest, while it is being made
        or less than SNAPSHOT_INTERVAL old, else a new one."""
        snapshot = self._snapshot
        if snapshot is None or (snapshot.done and time.monotonic()
                                - snapshot.made >= SNAPSHOT_INTERVAL):
            snapshot = self._snapshot = _Snapshot(self)
            self.add_chore(snapshot)
        return snapshot

    def _wake(self):
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass                    # full (a wake-up is pending) or closed

    # The loop ------------------------------------------------------------

    def serve_forever(self):
        self._serving = True
        queues = self.queues
        try:
            while not self._stopping:
                events = self._selector.select(self._select_timeout())
                queues.now = time.monotonic()
                queues.second = int(queues.now)
                for key, mask in events:
                    conn = key.data
                    if conn.__class__ is not _Conn:
                        conn()              # the listener or the wake-up pair
                        continue
                    if conn.handshaking:
                        self._handshake(conn)
                        continue
                    if mask & selectors.EVENT_WRITE:
                        self._write(conn)
                    if mask & selectors.EVENT_READ and not conn.closed:
                        self._read(conn)
                if self._deadlines:
                    self._expire_waiters()
                if self._leases:
                    self._expire_leases()
                if queues._deferred and queues.next_due() <= time.time():
                    self._release_due()
                if queues.limited:
                    queues.wake_limited(time.time())
                    if queues.ready:
                        self._serve_waiters()
                if self._chores:
                    self._do_chores()
                if self._resumed:
                    self._run_resumed()
                if self.store is not None:
                    self._commit()
                if self._dirty:
                    self._flush_dirty()
                if self._housekeeping_at <= time.monotonic():
                    self._housekeeping()
        finally:
            self._close_all()

    def _select_timeout(self):
        if self._resumed or self._chores:
            return 0
        timeout = min(SELECT_TIMEOUT_MAX,
                      self._housekeeping_at - time.monotonic())
        while self._deadlines and not self._deadlines[0][2].active:
            heapq.heappop(self._deadlines)
        if self._deadlines:
            timeout = min(timeout, self._deadlines[0][0] - time.monotonic())
        if self._leases:
            timeout = min(timeout, self._leases[0][0] - time.monotonic())
        for due in (self.queues.next_due(), self.queues.limited and
                    self.queues.next_token()):
            if due:
                timeout = min(timeout, due - time.time())
        return max(timeout, 0)

    def _housekeeping(self):
        # Once a second: accept again after running out of descriptors,
        # close TLS handshakes that stalled and subscribers that stayed
        # past the soft limit (even with nothing more published), and drop
        # the entries of leases that ended.
        now = time.monotonic()
        self._housekeeping_at = now + HOUSEKEEPING_INTERVAL
        for listener in self._paused:
            self._selector.register(listener, selectors.EVENT_READ,
                                    self._accept if listener is self._listener
                                    else self._accept_http)
        self._paused = []
        for conn in [conn for conn in self._conns.values()
                     if conn.handshaking and now - conn.created > TLS_HANDSHAKE_TIMEOUT]:
            self._close(conn)
        for conn in [conn for conn in self._conns.values()
                     if conn.over_soft_limit is not None]:
            self._check_subscriber_backlog(conn)
        if self._leases:
            self._drop_stale_leases()
        if self.queues.seen:
            try:
                self.queues.forget_seen(time.time())
            except StoreError:
                pass            # kept until the store writes again
        if self.queues.expiring and self._expiry is None:
            self._expiry = _Expiry(self)
            self.add_chore(self._expiry)
        if self.store is not None and self.store.expiring_rows:
            try:
                self.store.forget_expiring(time.time())
            except StoreError:
                pass
        if now >= self._sample_at:
            self._sample_at = now + SAMPLE_INTERVAL
            self.queues.sample(now)
            self.published = {channel: count for channel, count
                              in self.published.items()
                              if self.channels.subscribers(channel)}
            self.published_samples = {
                channel: (self.published_samples.get(channel, [])
                          + [(now, count)])[-MINUTE_SAMPLES:]
                for channel, count in self.published.items()}
            self.published_history.append((now, self.published_total))
        for conn in [conn for conn in self._http_conns
                     if now - conn.active > HTTP_TIMEOUT
                     or now - conn.created > HTTP_MAX_EXCHANGE]:
            conn.close()

    def _run(self, conn):
        """Run the requests conn has sent, in order, until it blocks, its
        unsent replies pass OUTPUT_LIMIT, or it has had its share of this
        pass (the rest runs in the next pass, after the others).

        Every request passes through this loop, so taking the next one,
        finding its command and keeping its reply are written out here
        rather than called: three calls fewer, about a tenth of a pipelined
        request's time."""
        reader, out, queues = conn.reader, conn.out, self.queues
        batch = reader.batch
        budget = REQUESTS_PER_PASS
        last = None
        while conn.waiter is None and not conn.closing:
            if conn.out_size > OUTPUT_LIMIT:
                conn.backlogged = True  # _write resumes it as the client reads
                return
            if not budget:
                self._resumed.append(conn)
                return
            budget -= 1
            if batch:
                args = batch.pop()
            else:
                try:
                    args = reader.read()
                except ReplyError as exc:
                    self._reply(conn, encode_error(_reading_error(exc)))
                    continue
                except ProtocolError as exc:
                    self._reply(conn, encode_error("ERR Protocol error: %s"
                                                   % exc))
                    conn.closing = True
                    break
                except Exception as exc:
                    # A bug must cost one connection, never the bus.
                    _warn("closed connection %d after an internal error: %r"
                          % (conn.id, exc))
                    self._close(conn)
                    break
                if args is None:
                    break
            # The request before, again (the same list: see _read_repeats,
            # a consumer's pipelined RESERVEs), has its command found and
            # its arity checked already: 900 instructions a job. COMMANDS
            # holds each name in upper and lower case, so most requests find
            # theirs without making a lower-case copy.
            if args is not last:
                command = COMMANDS.get(args[0]) or COMMANDS.get(
                    args[0].lower())
                if command is not None:
                    function, arity, name, route = command.dispatch
                    conn.command = name
                    if (len(args) == arity) if arity > 0 else (
                            len(args) >= -arity):
                        last = args
            if args is not last:
                reply = self._unknown(conn, args) if command is None else \
                    self._refuse(conn, str(_wrong_arity(name)), command)
            elif conn.guarded or route == 2:
                reply = self._run_checked(conn, command, args)
            else:
                # _call, written out: the flags that can matter on a
                # connection that is not guarded are denyoom's alone. _admit
                # is called only when it may refuse (the call is a thirtieth
                # of a job): past the memory bound, or when the reader has
                # not bounded the messages.
                try:
                    if route and (queues.size > self._memory_bound
                                  or not reader.bounded):
                        self._admit(command, args)
                    if function is cmd_push and batch:   # see _push_run
                        waiting = len(batch)
                        reply = self._push_run(conn, args, budget)
                        budget -= waiting - len(batch)
                    else:
                        reply = function(self, conn, args)
                except ReplyError as exc:
                    reply = encode_error(str(exc))
                except Exception as exc:
                    reply = _internal_error(args, exc)
            if reply is not None:
                if not out and conn.unsent is None:
                    self._dirty.append(conn)
                out.append(reply)
                conn.out_size += len(reply)
            if queues.ready:
                self._serve_waiters()

    def _push_run(self, conn, args, most):
        """RPUSH or LPUSH of one message, with the like pushes onto the same
        queue that follow it in the batch (at most `most` of them), as one
        push: their replies, one after another.

        A push's reply is its queue's length after it, so pushes that come
        one after another give the same replies, and leave the queue as
        one push of all their messages does, as long as nothing can take
        from the queue between them and none of them would be refused:
        the queue has no waiters (they are served after each request, as
        in Redis) and no bound, and the memory bound is not passed before
        the last one (each request is checked before it runs, as in
        Redis). This saves each put after the first the loop's checks and
        the queue's: a fifth of the instructions of a job in the job loop
        (42,300 -> 34,600) and of `-P 16` (15,500 -> 12,400). Messages
        of a run with a ttl expire together, at the first one's time plus
        the ttl, microseconds early for the others."""
        queues, batch = self.queues, conn.reader.batch
        verb, name = args[0], args[1]
        if len(args) != 3 or not conn.reader.bounded or \
                not queues.takes_runs(name):
            return cmd_push(self, conn, args)
        messages, bound = [args[2]], self._memory_bound
        size = queues.size + len(args[2]) + MESSAGE_COST
        while batch and len(messages) <= most and size <= bound:
            following = batch[-1]
            if len(following) != 3 or following[1] != name or \
                    following[0] != verb:
                break
            batch.pop()
            message = following[2]
            messages.append(message)
            size += len(message) + MESSAGE_COST
        try:
            length = queues.push(name, messages, verb[0] in b"lL")
        except ReplyError as exc:
            return encode_error(str(exc)) * len(messages)
        except Exception as exc:
            return _internal_error(args, exc) * len(messages)
        if length < SMALL_INTEGERS:
            return b"".join(_INTEGER_REPLIES[length - len(messages) + 1:
                                             length + 1])
        return b"".join(map(encode_int, range(length - len(messages) + 1,
                                              length + 1)))

    def _unknown(self, conn, args):
        """The reply to a command beuss does not know; None when the
        connection was closed instead."""
        if args[0].lower() in (b"get", b"head") and len(args) == 3 \
                and args[2].startswith(b"HTTP/"):
            # A browser or curl on the bus's port: one plain answer that
            # says where the status page is, then the close.
            conn.closing = True
            return ("HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain; "
                    "charset=utf-8\r\nConnection: close\r\n\r\nThis is the "
                    "port of beuss's bus, for Redis clients, not a web page. "
                    "%s\n" % ("The status page is at http://%s/." % (
                        _address_text(self.http)) if self.http else
                        "The status page is off: start the server with --http "
                        "PORT.")).encode()
        if args[0].lower() in (b"post", b"host:"):
            # A web page made a browser send this: close at once.
            self._complain("closed a connection from %s that spoke HTTP: a "
                           "cross-protocol attack?" % _address_text(conn.peer))
            conn.closing = True
            self._close(conn)
            return None
        return self._refuse(conn, _unknown_command(args))

    def _call(self, conn, command, args):
        try:
            if command.denyoom:
                self._admit(command, args)
            return command.function(self, conn, args)
        except ReplyError as exc:
            return encode_error(str(exc))
        except Exception as exc:
            return _internal_error(args, exc)

    def _admit(self, command, args):
        """Refuse a denyoom command whose messages pass the size limit, or
        any once queued messages pass the memory bound (the command that
        crossed it went through, as in Redis)."""
        first = command.messages
        if first:
            longest = len(args[first]) if len(args) == first + 1 else max(
                map(len, args[first:]))
            if longest > self.max_message_size:
                raise message_too_large(self.max_message_size)
        if self.max_memory and self.queues.size > self.max_memory:
            raise ReplyError(ERR_OOM)

    def _refuse(self, conn, text, command=None):
        """The error reply for a request refused before it ran; inside
        MULTI it also dooms the transaction, and a refused EXEC ends it, as
        in Redis."""
        if command is not None and command.name == b"exec":
            # Inside MULTI or not, as Redis does.
            if conn.multi is not None:
                self.end_transaction(conn)
            return encode_error("EXECABORT Transaction discarded because "
                                "of: " + (text[4:] if text.startswith("ERR ")
                                          else text))
        if conn.multi is not None:
            conn.multi_failed = True
        return encode_error(text)

    def _run_checked(self, conn, command, args):
        """Run or queue a request as its row's flags say: the path of a
        connection in a transaction, subscribed in RESP2, not yet
        authenticated or with a store that cannot write, and of commands
        made of subcommands."""
        try:
            command = _subcommand(command, args)
        except ReplyError as exc:
            return self._refuse(conn, str(exc))
        conn.command = command.name
        if not conn.authenticated and not command.no_auth:
            return self._refuse(conn, "NOAUTH Authentication required.",
                                command)
        write, denyoom = command.write, command.denyoom
        if command.name == b"exec" and conn.multi:
            # EXEC is what it runs, as Redis counts it.
            write = any(queued.write for queued, _ in conn.multi)
            denyoom = any(queued.denyoom for queued, _ in conn.multi)
        if write and self.store is not None and self.store.failing is not None:
            return self._refuse(conn, str(StoreError(self.store.failing)),
                                command)
        if conn.subscribed and not conn.resp3 and not command.subscribed:
            return self._refuse(conn, (
                "ERR Can't execute '%s': only (P|S)SUBSCRIBE / "
                "(P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this "
                "context") % command.name.decode("utf-8", "replace"), command)
        if conn.multi is not None and not command.at_once:
            # Queueing takes memory too: past the bound Redis refuses any
            # command here, and a refusal dooms the transaction.
            try:
                if command.denyoom:
                    self._admit(command, args)
                elif self.max_memory and self.queues.size > self.max_memory:
                    raise ReplyError(ERR_OOM)
            except ReplyError as exc:
                return self._refuse(conn, str(exc), command)
            # What waits for EXEC is bounded as unread input is.
            conn.multi_size += sum(map(len, args)) + 16 * len(args)
            if conn.multi_size > self.max_input:
                return self._refuse(conn, "ERR transaction too large: more "
                                    "than %d bytes queued" % self.max_input,
                                    command)
            conn.multi.append((command, args))
            return QUEUED
        if denyoom and command.name == b"exec" and self.max_memory \
                and self.queues.size > self.max_memory:
            return self._refuse(conn, ERR_OOM, command)
        return self._call(conn, command, args)

    def _update_guard(self, conn):
        conn.subscribed = self.channels.count(conn) > 0 \
            or self.shard_channels.count(conn) > 0
        conn.guarded = conn.multi is not None or conn.subscribed or (
            not conn.authenticated) or (
            self.store is not None and self.store.failing is not None)

    def _commit(self):
        """Group commit: the pass's changes, before its replies go out.

        When they cannot be committed, no reply of the pass may go out:
        every connection with replies waiting is held (its replies, and
        whatever it is answered after them, stay unsent) until a commit
        succeeds. Replies of later passes that change nothing go out, so
        reads go on. A store that starts or stops failing changes what
        every connection may run."""
        store = self.store
        was_failing = store.failing is not None
        changed = store.changes != self._changes_seen
        self._changes_seen = store.changes
        if store.commit():
            if self._held_back:
                held, self._held_back = self._held_back, []
                for conn in held:
                    conn.held = False
                    if conn.unsent is None and not conn.closed:
                        self._write(conn)
        elif changed:
            for conn in self._conns.values():
                if conn.out and not conn.held:
                    conn.held = True
                    self._held_back.append(conn)
        if (store.failing is not None) != was_failing:
            for conn in self._conns.values():
                self._update_guard(conn)

    # Authentication ------------------------------------------------------

    def authenticate(self, conn, user, password):
        """AUTH and HELLO AUTH. Without a token, like Redis's default user
        with no password, any password opens "default". A connection is
        closed after MAX_FAILED_AUTHS wrong tries."""
        if self.token is None:
            if user == b"default":
                return
        elif user == b"default" and _same_token(password, self.token):
            conn.authenticated = True
            conn.reader.locked = False
            conn.failed_auths = 0
            self._update_guard(conn)
            return
        else:
            conn.failed_auths += 1
            if conn.failed_auths >= MAX_FAILED_AUTHS:
                conn.closing = True
        raise ReplyError("WRONGPASS invalid username-password pair or user "
                         "is disabled.")

    def deauthenticate(self, conn):
        if self.token is not None:
            conn.authenticated = False
            conn.reader.locked = True
            self._update_guard(conn)

    # Transactions --------------------------------------------------------

    def begin_transaction(self, conn):
        conn.multi = []
        conn.multi_failed = False
        conn.multi_size = 0
        self._update_guard(conn)

    def end_transaction(self, conn):
        """Forget the queued commands and the watches (EXEC, DISCARD)."""
        conn.multi = None
        conn.multi_failed = False
        self._update_guard(conn)
        self.unwatch(conn)

    def execute_transaction(self, conn):
        """EXEC: run the queued commands, none of them waiting, and return
        their replies as one array; or refuse, or answer null when a
        watched queue changed."""
        commands, failed = conn.multi, conn.multi_failed
        changed = conn.watch is not None and conn.watch.changed
        self.end_transaction(conn)
        if failed:
            raise ReplyError("EXECABORT Transaction discarded because of "
                             "previous errors.")
        if changed:
            return conn.null_array
        if self.queues.bounded:
            self._check_room(commands)
        conn.in_exec = True
        try:
            replies = [self._call(conn, command, args)
                       for command, args in commands]
        finally:
            conn.in_exec = False
        return b"*%d\r\n" % len(replies) + b"".join(replies) \
            + self.pushed_to_self(conn)

    def _check_room(self, commands):
        """Refuse, before any runs, a transaction whose pushes and defers
        would pass a queue's rejecting bound (see Bounding in Queues)."""
        wanted = {}
        for command, args in commands:
            if command.function in (cmd_push, cmd_pushx, cmd_defer, cmd_put):
                pushed = args[2:3] if command.function is cmd_put else \
                    args[3 if command.function is cmd_defer else 2:]
                count, size = wanted.get(args[1], (0, 0))
                wanted[args[1]] = (count + len(pushed),
                                   size + sum(map(len, pushed)))
        for name, (count, size) in wanted.items():
            bound = self.queues.past_bound(name, count, size)
            if bound:
                raise ReplyError("%s: the transaction would pass it, and "
                                 "nothing of it ran" % self.queues.full(
                                     name, bound))

    def watch(self, conn, names):
        if conn.watch is None:
            conn.watch = Watch()
        if not conn.watch.changed:  # no point watching more, as Redis says
            for name in names:
                self.queues.watch(conn.watch, name)

    def unwatch(self, conn):
        if conn.watch is not None:
            self.queues.unwatch(conn.watch)
            conn.watch = None

    # Pub/sub -------------------------------------------------------------

    # Sharded channels (SSUBSCRIBE, SPUBLISH) are a namespace of their own,
    # as on one Redis node: counted apart, and without patterns.

    def subscribe(self, conn, names, pattern, shard=False):
        """SUBSCRIBE, PSUBSCRIBE or SSUBSCRIBE: one confirmation a name."""
        channels = self.shard_channels if shard else self.channels
        kind = b"ssubscribe" if shard else (
            b"psubscribe" if pattern else b"subscribe")
        replies = []
        for name in names:
            channels.subscribe(conn, name, pattern)
            replies.append(self._push(conn, kind, name, channels.count(conn)))
        self._update_guard(conn)
        return b"".join(replies)

    def unsubscribe(self, conn, names, pattern, shard=False):
        """UNSUBSCRIBE, PUNSUBSCRIBE or SUNSUBSCRIBE: one confirmation per
        name, or per subscription when no name is given."""
        channels = self.shard_channels if shard else self.channels
        kind = b"sunsubscribe" if shard else (
            b"punsubscribe" if pattern else b"unsubscribe")
        if not names:
            names = channels.subscriptions(conn)[pattern]
            if not names:
                return self._push(conn, kind, None, channels.count(conn))
        replies = []
        for name in names:
            channels.unsubscribe(conn, name, pattern)
            replies.append(self._push(conn, kind, name, channels.count(conn)))
        self._update_guard(conn)
        return b"".join(replies)

    def unsubscribe_all(self, conn):
        """End every subscription of conn, saying nothing (RESET, close)."""
        if conn.subscribed:
            for channels in (self.channels, self.shard_channels):
                names, patterns = channels.subscriptions(conn)
                for name in names:
                    channels.unsubscribe(conn, name)
                for name in patterns:
                    channels.unsubscribe(conn, name, True)
            self._update_guard(conn)

    # A message published to its own publisher goes after the reply of the
    # command that published it, and after the whole EXEC reply in a
    # transaction: Redis 7.2's order (7.0 sent it first, or inside EXEC's
    # array, where a RESP2 client would read it as a reply).

    def _deliver(self, conn, frame, publisher):
        if conn is publisher:
            if conn.pushed is None:
                conn.pushed = []
            conn.pushed.append(frame)
            return
        self._reply(conn, frame)
        self._check_subscriber_backlog(conn)

    def pushed_to_self(self, conn):
        """The messages conn published to itself, to follow the reply of
        the command (or, inside EXEC, of the transaction)."""
        if conn.pushed is None or conn.in_exec:
            return b""
        pushed, conn.pushed = conn.pushed, None
        return b"".join(pushed)

    def publish_shard(self, channel, message, publisher=None):
        """SPUBLISH: to the subscribers of a sharded channel."""
        receivers = self.shard_channels.receivers(channel)
        for conn, _ in receivers:
            self._deliver(conn, _encode_push(conn, [b"smessage", channel,
                                                    message]), publisher)
        return len(receivers)

    def publish(self, channel, message, publisher=None):
        """Send message to every subscriber of channel and every matching
        pattern now; return how many got it."""
        receivers = self.channels.receivers(channel)
        for conn, pattern in receivers:
            if pattern is None:
                frame = _encode_push(conn, [b"message", channel, message])
            else:
                frame = _encode_push(conn, [b"pmessage", pattern, channel,
                                            message])
            self._deliver(conn, frame, publisher)
        self.published_total += 1
        if channel in self.published or self.channels.subscribers(channel):
            self.published[channel] = self.published.get(channel, 0) + 1
        return len(receivers)

    def _push(self, conn, kind, name, count):
        head = b">3\r\n" if conn.resp3 else b"*3\r\n"
        name = conn.null_bulk if name is None else encode_bulk(name)
        return head + encode_bulk(kind) + name + encode_int(count)

    def _check_subscriber_backlog(self, conn):
        # Redis's pub/sub output limit: a subscriber that does not read is
        # closed at the hard limit at once, or past the soft one for long.
        size = conn.out_size
        if size <= PUBSUB_SOFT_LIMIT:
            conn.over_soft_limit = None
            return
        now = time.monotonic()
        if conn.over_soft_limit is None:
            conn.over_soft_limit = now
        if size > PUBSUB_HARD_LIMIT or (
                now - conn.over_soft_limit >= PUBSUB_SOFT_SECONDS):
            _warn("closed subscriber %d (%s): %d bytes of messages waited "
                  "unread" % (conn.id, _address_text(conn.peer), size))
            self._close(conn)

    # Clients -------------------------------------------------------------

    def clients(self):
        return list(self._conns.values())

    def client_info(self, conn):
        """One line of CLIENT LIST about conn."""
        channels, patterns = self.channels.subscriptions(conn)
        flags = ("P" if conn.subscribed else "") + (
            "x" if conn.multi is not None else "") + (
            "b" if conn.waiter is not None else "") + (
            "d" if conn.watch is not None and conn.watch.changed else "") + (
            "c" if conn.closing else "")
        now = time.monotonic()
        # Redis 7.2's fields (and 7.4's watch=), in its order; where beuss
        # has no such thing (its own reply buffer, argv memory) the value
        # Redis gives for none.
        pending = conn.reader.pending()
        multi_size = conn.multi_size if conn.multi is not None else 0
        return ("id=%d addr=%s laddr=%s fd=%d name=%s age=%d idle=%d "
                "flags=%s db=0 sub=%d psub=%d ssub=%d multi=%d watch=%d "
                "qbuf=%d qbuf-free=0 argv-mem=0 multi-mem=%d rbs=0 rbp=0 "
                "obl=0 oll=%d omem=%d tot-mem=%d events=r%s cmd=%s "
                "user=default redir=-1 resp=%d lib-name=%s lib-ver=%s "
                "held=%d waits=%s" % (
                    conn.id, _address_text(conn.peer), _address_text(
                        _local_address(conn.sock)), conn.sock.fileno(),
                    conn.name.decode("utf-8", "replace"),
                    now - conn.created, now - conn.active, flags or "N",
                    len(channels), len(patterns),
                    self.shard_channels.count(conn),
                    -1 if conn.multi is None else len(conn.multi),
                    len(conn.watch.names) if conn.watch is not None else 0,
                    pending, multi_size, len(conn.out), conn.out_size,
                    pending + multi_size + conn.out_size,
                    "w" if conn.writing else "",
                    conn.command.decode("utf-8", "replace"),
                    3 if conn.resp3 else 2,
                    conn.library[0].decode("ascii"),
                    conn.library[1].decode("ascii"),
                    len(self.queues.held_by(conn)), ",".join(
                        _name_text(name).replace("%", "%25").replace(
                            ",", "%2C").replace(" ", "%20")
                        for name in conn.waiter.names)
                    if conn.waiter is not None else ""))

    def kill(self, conn, killer):
        """CLIENT KILL: close conn now, or, when it killed itself, once its
        reply is sent."""
        if conn is killer:
            conn.closing = True
        else:
            self._close(conn)

    # Reserving -----------------------------------------------------------

    # A lease is an entry (deadline, sequence, Held) in a heap. TOUCH only
    # moves the Held's deadline: an entry found early is pushed again for
    # the new one. Entries of messages acknowledged or given back are
    # skipped when they come up, and dropped all at once at housekeeping
    # when they outnumber the live ones, so no call leaves anything behind.

    def reserved(self, held):
        """Start the lease of a message just reserved; its reply: queue,
        id, message and how many times it was delivered."""
        if self.lease:
            self.lease_held(held)
        try:
            heads = _BULK_HEADS
            return b"".join((
                _RESERVED_HEADS.get(held.queue) or _reserved_head(held.queue),
                heads[len(held.id)], held.id, b"\r\n", heads[len(
                    held.message)], held.message, b"\r\n",
                _INTEGER_REPLIES[held.deliveries]))
        except IndexError:  # a message of 4 KiB or more, or many deliveries
            return reserved_reply(held)

    def lease_held(self, held):
        held.deadline = time.monotonic() + self.lease
        self._sequence += 1
        heapq.heappush(self._leases, (held.deadline, self._sequence, held))

    def touch(self, held):
        if self.lease:
            held.deadline = time.monotonic() + self.lease

    def give_back(self, helds, delay=None, why=None, failed=True,
                  undelivered=False):
        """NACK, a close or a lease that ran out: the messages go back to
        their queues, at once or after a wait, or to their dead letters
        (see Queues.give_back)."""
        for held in helds:
            held.deadline = None
        self.queues.give_back(helds, delay, why, failed,
                              undelivered=undelivered)

    def _expire_leases(self):
        now = time.monotonic()
        leases = self._leases
        expired = []
        while leases and leases[0][0] <= now:
            entry = heapq.heappop(leases)
            held = entry[2]
            if held.owner is None or held.deadline is None:
                continue
            if held.deadline > now:         # touched since
                heapq.heappush(leases, (held.deadline,) + entry[1:])
            else:
                expired.append(held)
        if expired:
            # A consumer that let its lease run out failed the message.
            self._give_back_safely(expired, why="lease expired")

    def _drop_stale_leases(self):
        live = self.queues.held_count()
        if len(self._leases) > 2 * live + 64:
            self._leases = [entry for entry in self._leases
                            if entry[2].owner is not None]
            heapq.heapify(self._leases)

    def _give_back_safely(self, helds, why="its consumer went away"):
        # Giving back writes to the store; if that fails, the messages stay
        # held (they come back at the next start), and the server goes on.
        # A consumer that went away says nothing of the message: it comes
        # back at once, its delivery counted all the same (a message that
        # crashes every consumer still dies).
        try:
            self.give_back(helds, why=why, failed=why == "lease expired")
        except StoreError as exc:
            _warn("could not give back %d held messages: %s" % (len(helds),
                                                                  exc))
        if self.queues.ready:
            self._serve_waiters()

    # Blocking ------------------------------------------------------------

    def block(self, conn, waiter, timeout, instead):
        """Make conn wait (the command then returns None), or, inside EXEC,
        where nothing may wait, return the reply `instead`."""
        if conn.in_exec:
            return instead
        waiter.owner = conn
        conn.waiter = waiter
        self.queues.wait(waiter)
        if timeout:
            # The sequence number settles ties, which a coarse clock makes
            # common, before they reach the Waiter, which has no order.
            self._sequence += 1
            heapq.heappush(self._deadlines, (time.monotonic() + timeout,
                                             self._sequence, waiter))
        return None

    def _serve_waiters(self):
        for waiter, name, taken in self.queues.serve():
            conn = waiter.owner
            self._reply(conn, waiter.reply(name, taken))
            self._unblock(conn)

    def _unblock(self, conn):
        conn.waiter = None
        if conn.reader.pending():
            self._resumed.append(conn)
        self._update_events(conn)

    def _expire_waiters(self):
        now = time.monotonic()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            waiter = heapq.heappop(deadlines)[2]
            if waiter.active:
                self.queues.cancel(waiter)
                conn = waiter.owner
                self._reply(conn, conn.null_array)  # BLMOVE too, as Redis
                self._unblock(conn)

    def _release_due(self):
        # Messages set aside whose time came join their queues, MOVE_SLICE
        # a pass (the rest in the next passes), and their waiters are
        # served; a store that fails keeps them for later.
        try:
            self.queues.release_due(most=MOVE_SLICE)
        except StoreError:
            pass
        if self.queues.ready:
            self._serve_waiters()

    def _run_resumed(self):
        # Those that used up their share come back in the next pass.
        resumed, self._resumed = self._resumed, collections.deque()
        for conn in resumed:
            if not conn.closed:
                self._run(conn)
                self._update_events(conn)


def _reading_error(exc):
    """The text of a request the reader refused: an argument too large is
    a message too large only where the command's row says it stores
    messages (RPUSH's elements), else an argument too large."""
    command = getattr(exc, "command", None)
    if command is None:
        return str(exc)
    row = COMMANDS.get(command) or COMMANDS.get(command.lower())
    if row is not None and row.messages and exc.argument >= row.messages:
        return str(exc)
    return "ERR argument too large (max %d bytes)" % exc.limit


def _internal_error(args, exc):
    # A bug must cost one reply, never the bus.
    return encode_error("ERR internal error in '%s': %r" % (
        args[0].lower().decode("utf-8", "replace"), exc))


def half_the_memory():
    """Half of the machine's memory, where the system tells it; else 0."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (AttributeError, ValueError, OSError):
        return 0


def _encode_push(conn, items):
    """A pub/sub message: a push frame in RESP3, an array in RESP2."""
    return (b">" if conn.resp3 else b"*") + encode_bulks(items)[1:]


def _encode_mpop(name, messages):
    return b"*2\r\n" + encode_bulk(name) + encode_bulks(messages)


# ## Commands: queues #########################################################

# One small function a command: (server, conn, args) -> the encoded reply,
# or None when the client now waits. A refusal raises ReplyError. Arity and
# the flags of the command table are checked before a function runs, so a
# function checks only its own arguments. The families follow: queues,
# blocking, reserve and acknowledge, transactions, pub/sub, the connection
# and introspection; the table that names them all comes last.

def _unknown_command(args):
    # Redis quotes at most about 128 characters of the arguments.
    shown = ""
    for arg in args[1:]:
        if len(shown) >= 128:
            break
        shown += "'%s' " % arg.decode("utf-8", "replace")[:128 - len(shown)]
    return "ERR unknown command '%s', with args beginning with: %s" % (
        args[0].decode("utf-8", "replace")[:128], shown)


def _wrong_arity(name):
    return ReplyError("ERR wrong number of arguments for '%s' command"
                      % name.decode("utf-8", "replace"))


def _integer(arg, error=ERR_NOT_INTEGER):
    number = parse_integer(arg)
    if number is None:
        raise ReplyError(error)
    return number


_TIMEOUTS = {}       # timeouts read before: a client sends the same few


def _timeout(arg):
    """Seconds to wait, 0 for ever, as Redis reads a blocking timeout."""
    seconds = _TIMEOUTS.get(arg)
    if seconds is not None:
        return seconds
    text = arg.decode("ascii", "replace")
    if not text or text[0].isspace() or text[-1].isspace() or "_" in text:
        raise ReplyError(ERR_TIMEOUT_NOT_FLOAT)
    try:
        # Redis reads it with strtold, which also knows 0x hexadecimal.
        if text.lstrip("+-")[:2].lower() == "0x":
            seconds = float.fromhex(text)
        else:
            seconds = float(text)
    except ValueError:
        raise ReplyError(ERR_TIMEOUT_NOT_FLOAT)
    if seconds != seconds:
        raise ReplyError(ERR_TIMEOUT_NOT_FLOAT)
    if seconds < 0:
        raise ReplyError(ERR_TIMEOUT_NEGATIVE)
    if seconds > 1e12:
        raise ReplyError(ERR_TIMEOUT_RANGE)
    if len(_TIMEOUTS) >= 1000:
        _TIMEOUTS.clear()
    _TIMEOUTS[bytes(arg)] = seconds
    return seconds


def _delay(arg):
    """Seconds before a message is ready: DEFER's and NACK's DELAY."""
    try:
        seconds = float(arg)
    except ValueError:
        raise ReplyError("ERR delay is not a number")
    if seconds != seconds:
        raise ReplyError("ERR delay is not a number")
    if seconds < 0:
        raise ReplyError("ERR delay is negative")
    if seconds > MAX_DELAY:
        raise ReplyError("ERR delay is out of range (at most %d seconds)"
                         % MAX_DELAY)
    return seconds


def _side(arg):
    side = arg.upper()
    if side == b"LEFT":
        return True
    if side == b"RIGHT":
        return False
    raise ReplyError(ERR_SYNTAX)


def cmd_push(server, conn, args):
    left = args[0][0] in b"lL"
    length = server.queues.push(args[1], args[2:], left)
    # From the table without a call: a producer's every reply.
    return _INTEGER_REPLIES[length] if length < SMALL_INTEGERS else \
        encode_int(length)


def cmd_pushx(server, conn, args):
    # RPUSHX, LPUSHX: push only onto a queue that exists.
    left = args[0][0] in b"lL"
    if args[1] not in server.queues:
        return encode_int(0)
    return encode_int(server.queues.push(args[1], args[2:], left))


def cmd_pop(server, conn, args):
    left = args[0][0] in b"lL"
    if len(args) == 2:
        message = server.queues.pop_one(args[1], left)
        return conn.null_bulk if message is None else encode_bulk(message)
    if len(args) > 3:
        raise _wrong_arity(args[0].lower())
    count = parse_integer(args[2])
    if count is None or count < 0:
        raise ReplyError(ERR_NOT_POSITIVE)
    if args[1] not in server.queues:
        return conn.null_array
    return encode_bulks(server.queues.pop(args[1], left, count))


def _mpop_arguments(args, first):
    """(names, from_left, count) of LMPOP (first = 1) or BLMPOP (2)."""
    numkeys = parse_integer(args[first])
    if numkeys is None or numkeys < 1:
        raise ReplyError("ERR numkeys should be greater than 0")
    side = first + 1 + numkeys
    if side >= len(args):
        raise ReplyError(ERR_SYNTAX)
    from_left, count, i = _side(args[side]), None, side + 1
    while i < len(args):
        if count is None and args[i].upper() == b"COUNT" and i + 1 < len(args):
            count = parse_integer(args[i + 1])
            if count is None or count < 1:
                raise ReplyError("ERR count should be greater than 0")
            i += 2
        else:
            raise ReplyError(ERR_SYNTAX)
    return args[first + 1:side], from_left, count or 1


def _mpop(server, names, from_left, count):
    for name in names:
        messages = server.queues.pop(name, from_left, count)
        if messages:
            return _encode_mpop(name, messages)
    return None


def cmd_lmpop(server, conn, args):
    names, from_left, count = _mpop_arguments(args, 1)
    return _mpop(server, names, from_left, count) or conn.null_array


def cmd_lmove(server, conn, args):
    from_left, to_left = _side(args[3]), _side(args[4])
    message = server.queues.move(args[1], args[2], from_left, to_left)
    return conn.null_bulk if message is None else encode_bulk(message)


def cmd_rpoplpush(server, conn, args):
    message = server.queues.move(args[1], args[2], False, True)
    return conn.null_bulk if message is None else encode_bulk(message)


def cmd_llen(server, conn, args):
    return encode_int(server.queues.length(args[1]))


def cmd_lrange(server, conn, args):
    start, stop = _integer(args[2]), _integer(args[3])
    return encode_bulks(server.queues.peek(args[1], start, stop))


def cmd_lindex(server, conn, args):
    if args[1] not in server.queues:            # Redis looks before it parses
        return conn.null_bulk
    message = server.queues.index(args[1], _integer(args[2]))
    return conn.null_bulk if message is None else encode_bulk(message)


def cmd_lset(server, conn, args):
    if args[1] not in server.queues:
        raise ReplyError("ERR no such key")
    index = _integer(args[2])
    if not server.queues.replace(args[1], index, args[3]):
        raise ReplyError("ERR index out of range")
    return OK


def cmd_linsert(server, conn, args):
    where = args[2].upper()
    if where not in (b"BEFORE", b"AFTER"):
        raise ReplyError(ERR_SYNTAX)
    return encode_int(server.queues.insert(args[1], args[3], args[4],
                                           where == b"AFTER"))


def cmd_ltrim(server, conn, args):
    server.queues.trim(args[1], _integer(args[2]), _integer(args[3]))
    return OK


def cmd_lpos(server, conn, args):
    rank, count, maxlen, i = 1, None, 0, 3
    while i < len(args):
        option = args[i].upper()
        if i + 1 >= len(args) or option not in (b"RANK", b"COUNT", b"MAXLEN"):
            raise ReplyError(ERR_SYNTAX)
        if option == b"RANK":
            rank = _integer(args[i + 1])
            if rank == 0:
                raise ReplyError(
                    "ERR RANK can't be zero: use 1 to start from the first "
                    "match, 2 from the second ... or use negative to start "
                    "from the end of the list")
        else:
            number = parse_integer(args[i + 1])
            if number is None or number < 0:
                raise ReplyError("ERR %s can't be negative"
                                 % option.decode())
            if option == b"COUNT":
                count = number
            else:
                maxlen = number
        i += 2
    found = server.queues.positions(args[1], args[2], rank, count, maxlen)
    if count is not None:
        return b"*%d\r\n" % len(found) + b"".join(map(encode_int, found))
    return encode_int(found[0]) if found else conn.null_bulk


def cmd_lrem(server, conn, args):
    count = _integer(args[2])
    return encode_int(server.queues.remove(args[1], count, args[3]))


def cmd_del(server, conn, args):
    return encode_int(sum(server.queues.delete(name) for name in set(args[1:])))


def cmd_exists(server, conn, args):
    return encode_int(sum(name in server.queues for name in args[1:]))


def cmd_type(server, conn, args):
    return TYPE_LIST if args[1] in server.queues else TYPE_NONE


def cmd_keys(server, conn, args):
    names = server.queues.names()
    if args[1] != b"*":     # Redis's "*" takes every name, "" included
        match = glob_matcher(args[1])
        names = [name for name in names if match(name)]
    return encode_bulks(names)


def cmd_scan(server, conn, args):
    # Every queue comes back at once with cursor 0, which the SCAN contract
    # allows: COUNT is a hint, and no queue is missed or repeated.
    if parse_integer(args[1]) is None and not args[1].isdigit():
        raise ReplyError("ERR invalid cursor")
    match, kind, i = None, None, 2
    while i < len(args):
        option = args[i].upper()
        if i + 1 >= len(args):
            raise ReplyError(ERR_SYNTAX)
        if option == b"MATCH":
            match = None if args[i + 1] == b"*" else glob_matcher(args[i + 1])
        elif option == b"COUNT":
            if _integer(args[i + 1]) < 1:
                raise ReplyError(ERR_SYNTAX)
        elif option == b"TYPE":
            kind = args[i + 1].lower()
        else:
            raise ReplyError(ERR_SYNTAX)
        i += 2
    names = [] if kind not in (None, b"list") else server.queues.names()
    if match is not None:
        names = [name for name in names if match(name)]
    return b"*2\r\n" + encode_bulk(b"0") + encode_bulks(names)


def cmd_dbsize(server, conn, args):
    return encode_int(len(server.queues))


def cmd_flush(server, conn, args):
    if len(args) > 2 or (len(args) == 2
                         and args[1].upper() not in (b"ASYNC", b"SYNC")):
        raise ReplyError(ERR_SYNTAX)
    server.queues.clear()
    return OK


# ## Commands: blocking #######################################################

# Each takes at once when it can; otherwise it makes a Waiter that says how
# it takes a message and how the client is answered, and the server blocks
# the client on it (inside EXEC, where nothing waits, the null reply).

def cmd_bpop(server, conn, args):
    left = args[0][1] in b"lL"
    names = list(dict.fromkeys(args[1:-1]))     # BLPOP q q waits once on q
    timeout = _timeout(args[-1])
    for name in names:
        message = server.queues.pop_one(name, left)
        if message is not None:
            return encode_bulks([name, message])
    waiter = Waiter(names, lambda queues, name: queues.pop_one(name, left),
                    lambda name, message: encode_bulks([name, message]))
    return server.block(conn, waiter, timeout, conn.null_array)


def cmd_blmpop(server, conn, args):
    names, from_left, count = _mpop_arguments(args, 2)
    timeout = _timeout(args[1])     # after the rest, as Redis checks it
    reply = _mpop(server, names, from_left, count)
    if reply is not None:
        return reply
    waiter = Waiter(list(dict.fromkeys(names)),
                    lambda queues, name: queues.pop(name, from_left, count),
                    _encode_mpop)
    return server.block(conn, waiter, timeout, conn.null_array)


def cmd_blmove(server, conn, args):
    from_left, to_left = _side(args[3]), _side(args[4])
    return _blocking_move(server, conn, args[1], args[2], from_left, to_left,
                          args[5])


def cmd_brpoplpush(server, conn, args):
    return _blocking_move(server, conn, args[1], args[2], False, True, args[3])


def _blocking_move(server, conn, source, target, from_left, to_left, timeout):
    timeout = _timeout(timeout)
    message = server.queues.move(source, target, from_left, to_left)
    if message is not None:
        return encode_bulk(message)
    waiter = Waiter([source], lambda queues, name: queues.move(
        name, target, from_left, to_left), lambda name, message: encode_bulk(message))
    return server.block(conn, waiter, timeout, conn.null_bulk)


# ## Commands: beuss's own, for both engines ################################

# RESERVE holds a message under an id until ACK removes it, NACK or the
# lease gives it back, and TOUCH renews the lease (a client acts on the
# messages it holds only); DEFER, REDRIVE, WHY, PAUSE and RESUME follow the
# life cycle drawn in Queues. The names do not clash with Redis's.
#
# Each is declared once for both engines, here: its row in the command
# table, the function the server runs, and beside it the Lua script that
# the client runs in its place on a Redis, a Valkey or a Redis Cluster
# (_LUA; _UNSCRIPTED says why a command needs none). Adding one is a row, a
# function, a script and a step in the life-cycle table of the tests, which
# runs every engine through the same steps.
#
# On Redis the ready messages stay a plain list under the queue's name,
# which any Redis client may RPUSH to; the rest lives in companion keys of
# the queue's slot, "{jobs}:held" and the like for a queue "jobs" (see
# _script_keys). Time is the server's (TIME), so consumers' clocks need not
# agree. A lease that ran out is noticed by the next reserve on its queue,
# a hundred at most a call. No script can block: a consumer waiting for a
# message polls, 5 ms longer after each empty try, 0.1 s at most.

# A queue's companion keys on Redis, in the order the scripts take them
# after the queue itself: held ids with their lease's end (a sorted set),
# waiting ids with when they are ready (a sorted set), each id's message
# and deliveries (hashes), ids ready again after a failure (a list, taken
# before the queue), dead letters and, in step with them, why each died
# (lists), the last id given, a flag that PAUSE sets (the reserve script
# delivers nothing while it is there), QUEUE SET's settings (a hash), and
# the runs of expiring messages ("until count ttl", a list) with how many
# of the queue's last messages they cover (see Expiring in Queues).
COMPANIONS = (b"held", b"deferred", b"messages", b"deliveries", b"again",
              b"dead", b"why", b"ids", b"paused", b"settings", b"expiring",
              b"covered")

# Every script starts so: the server's clock, the keys by name (the queue,
# then COMPANIONS), and what a failure does: to the dead letters after the
# last delivery, else back to the head after delay, or after the retry
# schedule's wait (Queues.retry_wait's) when delay is negative.
_LUA_START = """
if redis.replicate_commands then redis.replicate_commands() end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function bury(message, tries, reason)
  redis.call('RPUSH', dead, message)
  redis.call('RPUSH', why, tries .. ' ' .. string.format('%.3f', now) ..
    ' ' .. reason)
end
local function fail(id, delay, reason, max, first, longest)
  local tries = tonumber(redis.call('HGET', deliveries, id) or '0')
  if max > 0 and tries >= max then
    if reason == '' then reason = 'failed ' .. tries .. ' deliveries' end
    bury(redis.call('HGET', messages, id), tries, reason)
    redis.call('HDEL', messages, id)
    redis.call('HDEL', deliveries, id)
  else
    if delay < 0 then
      delay = 0
      if first > 0 then delay = first * 2 ^ math.min(tries - 1, 64) end
      if longest > 0 and delay > longest then delay = longest end
    end
    if delay > 0 then
      redis.call('ZADD', deferred, now + delay, id)
    else
      redis.call('LPUSH', again, id)
    end
  end
end
local function leased(lease)
  if lease > 0 then return now + lease end
  return 'inf'
end
local function setting(name)
  return redis.call('HGET', settings, name) or DEFAULTS[name]
end
local function seconds(text)    -- a time as _duration_text writes it
  local number, unit = string.match(text, '^([%d.]+)(%a)$')
  return tonumber(number) * ({s = 1, m = 60, h = 3600, d = 86400})[unit]
end
local function fit_runs()
  -- The oldest runs cut to cover no more than the queue holds.
  local length = redis.call('LLEN', queue)
  local n = tonumber(redis.call('GET', covered) or '0')
  local cut = n > length
  while n > length do
    local run = redis.call('LINDEX', expiring, 0)
    local last, count, ttl = string.match(run, '^(%S+) (%d+) (%S+)$')
    if tonumber(count) <= n - length then
      redis.call('LPOP', expiring)
      n = n - tonumber(count)
    else
      redis.call('LSET', expiring, 0, last .. ' ' ..
        (tonumber(count) - n + length) .. ' ' .. ttl)
      n = length
    end
  end
  if cut and n == 0 then redis.call('DEL', covered, expiring) end
  if cut and n > 0 then redis.call('SET', covered, n) end
  return n, length
end
local function cover(count, ttl)
  -- A run for count messages joining the tail; without a ttl ('') one
  -- that never ends, if some of the queue's messages expire.
  if ttl == '' and redis.call('EXISTS', covered) == 0 then return end
  fit_runs()
  local last = '-'
  if ttl == '' then ttl = '-' else
    last = string.format('%.6f', now + seconds(ttl))
  end
  local run = redis.call('LINDEX', expiring, -1)
  local previous, size, same = string.match(run or '', '^(%S+) (%d+) (%S+)$')
  if same == ttl and (ttl == '-' or last - previous < 1) then
    redis.call('LSET', expiring, -1, last .. ' ' .. (size + count) .. ' ' ..
      ttl)
  else
    redis.call('RPUSH', expiring, last .. ' ' .. count .. ' ' .. ttl)
  end
  redis.call('INCRBY', covered, count)
end
local function expire(most)
  -- Expired messages at the head to the dead letters, at most most;
  -- true when the head is still expired after them.
  local n, length = fit_runs()
  local was = n
  while n > 0 and n == length do
    local run = redis.call('LINDEX', expiring, 0)
    local last, count, ttl = string.match(run, '^(%S+) (%d+) (%S+)$')
    if last == '-' or tonumber(last) > now then break end
    if most <= 0 then return true end
    bury(redis.call('LPOP', queue), 0, 'expired after ' .. ttl)
    n, length, most = n - 1, length - 1, most - 1
    if tonumber(count) == 1 then
      redis.call('LPOP', expiring)
    else
      redis.call('LSET', expiring, 0, last .. ' ' .. (count - 1) .. ' ' .. ttl)
    end
  end
  if n ~= was and n == 0 then redis.call('DEL', covered, expiring) end
  if n ~= was and n > 0 then redis.call('SET', covered, n) end
  return false
end
local function bound()
  -- A queue's max-length (0: none), its overflow, and its ready messages.
  return tonumber(setting('max-length')), setting('overflow'),
    redis.call('LLEN', queue) + redis.call('LLEN', again)
end
local function weight()
  -- A queue's max-bytes (0: none) and the bytes of its ready messages,
  -- summed: Redis keeps no such count (a pass over the queue each time).
  local most, size = tonumber(setting('max-bytes')), 0
  if most == 0 then return 0, 0 end
  for first = 0, redis.call('LLEN', queue) - 1, 1000 do
    for _, message in ipairs(redis.call('LRANGE', queue, first, first + 999)) do
      size = size + #message
    end
  end
  for _, id in ipairs(redis.call('LRANGE', again, 0, -1)) do
    size = size + redis.call('HSTRLEN', messages, id)
  end
  return most, size
end
local function full(held, bound)
  return redis.error_reply('FULL queue ' .. queue .. ' holds ' .. held ..
    ', its ' .. bound)
end
local function holding(token)
  local id, count = string.match(token, '^(%d+)/(%d+)$')
  if id and redis.call('ZSCORE', held, id) and
      redis.call('HGET', deliveries, id) == count then
    return id
  end
end
"""

_LUA = {}                       # command -> its script's body
# beuss's own commands that need no script on Redis, and what does instead.
_UNSCRIPTED = {
    "why": "LRANGE of the dead letters and of their records",
    "pause": "SET NX of the queue's paused companion, read by reserve",
    "resume": "DEL of the queue's paused companion",
    "queue": "HSET, HGETALL or DEL of the queue's settings companion",
}


# What RESERVE gives for one message: queue, id, message and deliveries.
# It is joined from pieces kept ready where they can be: the part that
# names the queue (_RESERVED_HEADS, for up to RESERVED_HEADS_KEPT names of
# up to 256 bytes: 270 KB at most), the length lines (_BULK_HEADS) and the
# count (_INTEGER_REPLIES). Formatting them each time cost about 1,700
# instructions a job more.
_RESERVED_HEADS = {}
RESERVED_HEADS_KEPT = 1024


def _reserved_head(name):
    """The part of RESERVE's reply that names queue name, kept ready."""
    head = b"*4\r\n" + encode_bulk(name)
    if len(name) <= 256:
        if len(_RESERVED_HEADS) >= RESERVED_HEADS_KEPT:
            _RESERVED_HEADS.clear()
        _RESERVED_HEADS[name] = head
    return head


def reserved_reply(held):
    """RESERVE's reply for held, whatever the sizes of its numbers."""
    return b"*4\r\n" + b"".join(map(encode_bulk, (
        held.queue, held.id, held.message))) + encode_int(held.deliveries)


def cmd_reserve(server, conn, args):
    # RESERVE q [q ...] timeout [COUNT n]: with COUNT, up to n messages of
    # the first queue that has any, as an array of what RESERVE gives one.
    if len(args) == 3:              # one queue, no COUNT: most often
        # (_timeout's cache read here first: a consumer's every request.)
        timeout = _TIMEOUTS.get(args[2]) or _timeout(args[2])
        held = server.queues.reserve(args[1], conn)
        if held is not None:
            # server.reserved(held), written out: a consumer's every
            # request (a call costs about 600 instructions).
            if server.lease:
                server.lease_held(held)
            try:
                heads = _BULK_HEADS
                return b"".join((
                    _RESERVED_HEADS.get(held.queue) or _reserved_head(
                        held.queue), heads[len(held.id)], held.id, b"\r\n",
                    heads[len(held.message)], held.message, b"\r\n",
                    _INTEGER_REPLIES[held.deliveries]))
            except IndexError:
                return reserved_reply(held)
        return _wait_to_reserve(server, conn, (args[1],), timeout)
    count = None
    if len(args) >= 5 and args[-2].upper() == b"COUNT":
        count = parse_integer(args[-1])
        if count is None or count < 1:
            raise ReplyError("ERR count should be greater than 0")
        args = args[:-2]
    timeout = _timeout(args[-1])
    names = list(dict.fromkeys(args[1:-1]))
    if count is not None:
        return _reserve_many(server, conn, names, timeout, count)
    for name in names:
        held = server.queues.reserve(name, conn)
        if held is not None:
            return server.reserved(held)
    return _wait_to_reserve(server, conn, names, timeout)


# cmd_reserve's wait and its COUNT, apart: a function that makes closures
# pays for their cells at every call, even one that makes none.

def _wait_to_reserve(server, conn, names, timeout):
    waiter = Waiter(names, lambda queues, name: queues.reserve(name, conn),
                    lambda name, held: server.reserved(held))
    return server.block(conn, waiter, timeout, conn.null_array)


def _reserve_many(server, conn, names, timeout, count):
    def take(queues, name):
        # Each one's reply as it is taken (what take returns is handed to
        # reply): its lease starts now.
        replies = []
        for _ in range(count):
            held = queues.reserve(name, conn)
            if held is None:
                break
            replies.append(server.reserved(held))
        return replies

    def reply(name, replies):
        return b"*%d\r\n" % len(replies) + b"".join(replies)
    for name in names:
        replies = take(server.queues, name)
        if replies:
            return reply(name, replies)
    return server.block(conn, Waiter(names, take, reply), timeout,
                        conn.null_array)


# ARGV: lease, max deliveries, first retry wait, longest retry wait.
# Returns {id, message, deliveries}, or nil when none is ready.
_LUA["reserve"] = """
local lease, max, first, longest = tonumber(ARGV[1]), tonumber(ARGV[2]),
  tonumber(ARGV[3]), tonumber(ARGV[4])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', held, '-inf', now,
                               'LIMIT', 0, 100)) do
  redis.call('ZREM', held, id)
  fail(id, -1, 'lease expired', max, first, longest)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', deferred, '-inf', now,
                               'LIMIT', 0, 100)) do
  redis.call('ZREM', deferred, id)
  if redis.call('HEXISTS', deliveries, id) == 1 then
    redis.call('RPUSH', again, id)
  else
    cover(1, '')
    redis.call('RPUSH', queue, redis.call('HGET', messages, id))
    redis.call('HDEL', messages, id)
  end
end
if redis.call('EXISTS', paused) == 1 then return false end
local taking, rate, interval = tonumber(ARGV[5] or '1'), setting('rate')
if rate ~= '0' then             -- one delivery every interval (Rating)
  local count, unit = string.match(rate, '^([%d.]+)/(%a)$')
  interval = ({s = 1, m = 60, h = 3600})[unit] / tonumber(count)
  if now < tonumber(redis.call('HGET', settings, 'next') or '0') then
    return false
  end
  taking = 1
end
local taken = {}
for _ = 1, taking do
  local id, message, count = redis.call('LPOP', again)
  if id then
    message = redis.call('HGET', messages, id)
    count = redis.call('HINCRBY', deliveries, id, 1)
  else
    if expire(100) then break end
    message = redis.call('LPOP', queue)
    if not message then break end
    id = string.format('%012d', redis.call('INCR', ids))
    redis.call('HSET', messages, id, message)
    redis.call('HSET', deliveries, id, 1)
    count = 1
  end
  redis.call('ZADD', held, leased(lease), id)
  taken[#taken + 1] = id
  taken[#taken + 1] = message
  taken[#taken + 1] = count
end
if #taken == 0 then return false end
if interval then redis.call('HSET', settings, 'next', now + interval) end
return taken
"""


def _held(server, conn, args):
    """The messages conn holds among the ids it named, each once."""
    return server.queues.held_by(conn, args[1:])


def cmd_ack(server, conn, args):
    helds = _held(server, conn, args)
    server.queues.ack(helds)
    return encode_int(len(helds))


# ARGV: tokens ("<id>/<delivery>": one delivery's, so that a consumer
# whose lease ran out cannot act on the next one's). Returns how many
# were held.
_LUA["ack"] = """
local count = 0
for i = 1, #ARGV do
  local id = holding(ARGV[i])
  if id then
    redis.call('ZREM', held, id)
    redis.call('HDEL', messages, id)
    redis.call('HDEL', deliveries, id)
    count = count + 1
  end
end
return count
"""


def cmd_nack(server, conn, args):
    # NACK id [id ...] [DELAY seconds] [REASON text] | [UNDELIVERED]: the
    # last for a consumer that could not start on the messages (its command
    # cannot be found): back at once, the delivery not counted.
    ids, delay, why, undelivered, i = [], None, None, False, 1
    while i < len(args):
        word = args[i].upper()
        if word in (b"DELAY", b"REASON") and i + 1 < len(args):
            if word == b"DELAY":
                delay = _delay(args[i + 1])
            else:
                why = args[i + 1].decode("utf-8", "replace")[:MAX_REASON]
            i += 2
        elif word == b"UNDELIVERED":
            undelivered = True
            i += 1
        elif word in (b"DELAY", b"REASON") or delay is not None \
                or why is not None or undelivered:
            raise ReplyError(ERR_SYNTAX)
        else:
            ids.append(args[i])
            i += 1
    if not ids:
        raise _wrong_arity(b"nack")
    if undelivered and (delay is not None or why is not None):
        raise ReplyError("ERR UNDELIVERED gives messages back at once, as "
                         "they were: no DELAY or REASON with it")
    helds = _held(server, conn, [b"nack"] + ids)
    server.give_back(helds, delay, why, undelivered=undelivered)
    return encode_int(len(helds))


# ARGV: delay (-1: the schedule), reason, max deliveries, first and
# longest retry wait, undelivered (1: back at once, the delivery not
# counted), tokens. Last to first, so that the messages given back at
# once keep their order at the head.
_LUA["nack"] = """
local delay, reason, max, first, longest = tonumber(ARGV[1]), ARGV[2],
  tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local undelivered = ARGV[6] == '1'
local count = 0
for i = #ARGV, 7, -1 do
  local id = holding(ARGV[i])
  if id then
    redis.call('ZREM', held, id)
    if undelivered then
      redis.call('HINCRBY', deliveries, id, -1)
      redis.call('LPUSH', again, id)
    else
      fail(id, delay, reason, max, first, longest)
    end
    count = count + 1
  end
end
return count
"""


def cmd_defer(server, conn, args):
    seconds = _delay(args[2])
    return encode_int(server.queues.defer(args[1], args[3:], seconds))


# ARGV: delay, messages. Returns how many of the queue's messages wait.
# Ids are zero-padded: waiting ids due at once sort in the order given.
_LUA["defer"] = """
local most, overflow, length = bound()
if most > 0 and overflow == 'reject' and
    length + redis.call('ZCARD', deferred) + #ARGV - 1 > most then
  return full(length .. ' messages', 'max-length')
end
local most_bytes, size = weight()
if overflow == 'reject' and most_bytes > 0 then
  local pushed = 0
  for i = 2, #ARGV do pushed = pushed + #ARGV[i] end
  if size + pushed > most_bytes then
    return full(size .. ' bytes', 'max-bytes')
  end
end
local due = now + tonumber(ARGV[1])
for i = 2, #ARGV do
  local id = string.format('%012d', redis.call('INCR', ids))
  redis.call('HSET', messages, id, ARGV[i])
  redis.call('ZADD', deferred, due, id)
end
return redis.call('ZCARD', deferred)
"""


def cmd_redrive(server, conn, args):
    # A redrive of many moves MOVE_SLICE a pass and answers when it is done
    # (the client waits, as in BLPOP); inside EXEC, all at once.
    if len(args) > 3:
        raise ReplyError(ERR_SYNTAX)
    queues, name = server.queues, args[1]
    count = queues.length(dead_letters(name))
    if len(args) == 3:
        asked = parse_integer(args[2])
        if asked is None or asked < 1:
            raise ReplyError("ERR count should be greater than 0")
        count = min(asked, count)
    if conn.in_exec or count <= MOVE_SLICE:
        return encode_int(queues.redrive(name, count))
    progress = [0]

    def step():
        moved = queues.redrive(name, min(count - progress[0], MOVE_SLICE))
        progress[0] += moved
        return encode_int(progress[0]) if (
            not moved or progress[0] >= count) else None
    return server.wait_for(conn, step)


# ARGV: how many dead letters to move back to the tail, as new.
_LUA["redrive"] = """
local moved = 0
while moved < tonumber(ARGV[1]) do
  local message = redis.call('LPOP', dead)
  if not message then break end
  redis.call('LPOP', why)
  cover(1, '')
  redis.call('RPUSH', queue, message)
  moved = moved + 1
end
return moved
"""


# ARGV: messages, then as many records ("tries died why"), for a move.
# Returns how many dead letters there are now.
_LUA["put_dead"] = """
local half = #ARGV / 2
for i = 1, half do
  redis.call('RPUSH', dead, ARGV[i])
  redis.call('RPUSH', why, ARGV[half + i])
end
return redis.call('LLEN', dead)
"""


def cmd_pause(server, conn, args):
    # PAUSE q [q ...], RESUME q [q ...]: how many changed.
    paused = args[0].lower() == b"pause"
    return encode_int(sum(server.queues.pause(name, paused) for name in
                          dict.fromkeys(args[1:])))


def cmd_queue(server, conn, args):
    # QUEUE SET q name value ..., QUEUE GET q, QUEUE RESET q.
    if args[1].upper() == b"HELP":
        return _help(b"queue")
    sub, name, queues = args[1].lower(), args[2], server.queues
    if sub == b"get":
        settings = queues.settings.get(name, {})
        return encode_bulks([_arg(part) for setting, (default, _) in
                             QUEUE_SETTINGS.items() for part in (
                                 setting, _queue_value(settings.get(
                                     setting, default)))])
    if name.endswith(b".dead"):
        raise ReplyError("ERR %s holds dead letters, which take no settings"
                         % _name_text(name))
    queues.configure(name, _queue_settings(args[3:], queues.settings.get(
        name)) if sub == b"set" else {})
    return OK


def cmd_put(server, conn, args):
    # PUT q message [ID key] [TTL seconds]: RPUSH of one message, once per
    # key, expiring after its own ttl.
    options = {}
    for i in range(3, len(args) - 1, 2):
        word = args[i].upper()
        if word not in (b"ID", b"TTL") or word in options:
            raise ReplyError(ERR_SYNTAX)
        options[word] = args[i + 1]
    if len(args) % 2 == 0:
        raise ReplyError(ERR_SYNTAX)
    ttl = None
    if b"TTL" in options:
        try:
            ttl = _delay(options[b"TTL"])
        except ReplyError as exc:
            raise ReplyError(str(exc).replace("delay", "TTL"))
        if not ttl:
            raise ReplyError("ERR TTL must be more than 0 seconds")
    if b"ID" in options:
        return encode_int(server.queues.put_once(args[1], options[b"ID"],
                                                 args[2], ttl=ttl))
    return encode_int(server.queues.push(args[1], [args[2]], ttl=ttl))


def cmd_why(server, conn, args):
    if len(args) not in (2, 4):
        raise ReplyError(ERR_SYNTAX)
    start, stop = (_integer(args[2]), _integer(args[3])) if len(args) == 4 \
        else (0, -1)
    return _encode_records(conn, server.queues.dead_records(args[1], start,
                                                            stop))


def _encode_records(conn, records):
    """WHY's reply: for each message [message, deliveries, died, why], the
    last three null for a message that is not a dead letter."""
    encoded = []
    for message, tries, died, why in records:
        if why is None:
            encoded.append(b"*4\r\n" + encode_bulk(message) + conn.null_bulk
                           * 3)
        else:
            encoded.append(b"*4\r\n" + encode_bulk(message) + encode_int(
                tries) + encode_bulk(b"%.3f" % died) + encode_bulk(
                    why.encode("utf-8", "replace")))
    return b"*%d\r\n" % len(encoded) + b"".join(encoded)


def cmd_touch(server, conn, args):
    helds = _held(server, conn, args)
    for held in helds:
        server.touch(held)
    return encode_int(len(helds))


# ARGV: lease, tokens. Returns how many were held.
_LUA["touch"] = """
local lease, count = tonumber(ARGV[1]), 0
for i = 2, #ARGV do
  local id = holding(ARGV[i])
  if id then
    redis.call('ZADD', held, leased(lease), id)
    count = count + 1
  end
end
return count
"""


# RPUSH and PUT ... ID on Redis, where a bounded queue's push is this
# script: ARGV an id ('' for none; the last key is then its key), a ttl
# ('' for the queue's) and the messages; returns the ready messages as the server's push does, or 0 for
# an id known (see Bounding and Putting once in Queues for the rules).
_LUA["put"] = """
local id, ttl = ARGV[1], ARGV[2]
if id ~= '' and redis.call('EXISTS', KEYS[#KEYS]) == 1 then return 0 end
local most, overflow, length = bound()
local most_bytes, held = weight()
local first, last, count, size = 3, #ARGV, length + #ARGV - 2, held
for i = first, last do size = size + #ARGV[i] end
local function over()
  return most > 0 and count > most or most_bytes > 0 and size > most_bytes
end
if over() and overflow == 'reject' then
  if most > 0 and count > most then
    return full(length .. ' messages', 'max-length')
  end
  return full(held .. ' bytes', 'max-bytes')
elseif over() and overflow == 'drop-oldest' then
  while over() and length > 0 do          -- the head: retries first
    local id, message, tries = redis.call('LPOP', again), nil, 0
    if id then
      message = redis.call('HGET', messages, id)
      tries = redis.call('HGET', deliveries, id)
      redis.call('HDEL', messages, id)
      redis.call('HDEL', deliveries, id)
    else
      message = redis.call('LPOP', queue)
    end
    bury(message, tries, 'overflow')
    count, size, length = count - 1, size - #message, length - 1
  end
  while over() and first <= last do       -- then the push's oldest
    bury(ARGV[first], 0, 'overflow')
    count, size, first = count - 1, size - #ARGV[first], first + 1
  end
elseif over() then                        -- drop-newest
  while over() and first <= last do
    count, size, last = count - 1, size - #ARGV[last], last - 1
  end
  for i = last + 1, #ARGV do bury(ARGV[i], 0, 'overflow') end
end
if ttl == '' and setting('ttl') ~= DEFAULTS['ttl'] then ttl = setting('ttl') end
if first <= last then cover(last - first + 1, ttl) end
if first <= last then
  redis.call('RPUSH', queue, unpack(ARGV, first, last))
end
if id ~= '' then
  redis.call('SET', KEYS[#KEYS], '1', 'PX',
             math.max(math.floor(seconds(setting('dedup-window')) * 1000), 1))
end
return redis.call('LLEN', queue) + redis.call('LLEN', again)
"""


# DEL is Redis's, but on Redis a queue's companions go with it. DEL of a
# queue: its messages, those ready again and those set aside
# (held ones stay with their consumers). Returns 1 if it held ready
# messages, as DEL counts.
_LUA["del"] = """
local ready = redis.call('LLEN', queue) + redis.call('LLEN', again)
for _, id in ipairs(redis.call('LRANGE', again, 0, -1)) do
  redis.call('HDEL', messages, id)
  redis.call('HDEL', deliveries, id)
end
for _, id in ipairs(redis.call('ZRANGE', deferred, 0, -1)) do
  redis.call('HDEL', messages, id)
  redis.call('HDEL', deliveries, id)
end
redis.call('DEL', queue, again, deferred, expiring, covered)
if ready > 0 then return 1 end
return 0
"""


# ## Commands: transactions ###################################################

def cmd_multi(server, conn, args):
    if conn.multi is not None:
        raise ReplyError("ERR MULTI calls can not be nested")
    server.begin_transaction(conn)
    return OK


def cmd_exec(server, conn, args):
    if conn.multi is None:
        raise ReplyError("ERR EXEC without MULTI")
    return server.execute_transaction(conn)


def cmd_discard(server, conn, args):
    if conn.multi is None:
        raise ReplyError("ERR DISCARD without MULTI")
    server.end_transaction(conn)
    return OK


def cmd_watch(server, conn, args):
    if conn.multi is not None:
        raise ReplyError("ERR WATCH inside MULTI is not allowed")
    server.watch(conn, args[1:])
    return OK


def cmd_unwatch(server, conn, args):
    server.unwatch(conn)
    return OK


# ## Commands: pub/sub ########################################################

def cmd_subscribe(server, conn, args):
    # SUBSCRIBE, PSUBSCRIBE, SSUBSCRIBE. Inside EXEC a client expects one
    # reply a command: Redis lets SUBSCRIBE and PSUBSCRIBE through there,
    # not SSUBSCRIBE (src/pubsub.c, since 7.0).
    shard = args[0].lower() == b"ssubscribe"
    if shard and conn.in_exec:
        raise ReplyError("ERR SSUBSCRIBE isn't allowed for a DENY BLOCKING "
                         "client")
    return server.subscribe(conn, args[1:], args[0][0] in b"pP", shard)


def cmd_unsubscribe(server, conn, args):
    return server.unsubscribe(conn, args[1:], args[0][0] in b"pP",
                              args[0].lower() == b"sunsubscribe")


def cmd_publish(server, conn, args):
    return encode_int(server.publish(args[1], args[2], conn)) \
        + server.pushed_to_self(conn)


def cmd_spublish(server, conn, args):
    return encode_int(server.publish_shard(args[1], args[2], conn)) \
        + server.pushed_to_self(conn)


def cmd_pubsub(server, conn, args):
    sub = args[1].upper()
    if sub == b"HELP":
        return _help(b"pubsub")
    channels = server.shard_channels if sub.startswith(b"SHARD") \
        else server.channels
    if sub in (b"CHANNELS", b"SHARDCHANNELS") and len(args) <= 3:
        match = glob_matcher(args[2]) if len(args) == 3 else None
        return encode_bulks(channels.channels(match))
    if sub in (b"NUMSUB", b"SHARDNUMSUB"):
        return b"*%d\r\n" % (2 * len(args) - 4) + b"".join(
            encode_bulk(name) + encode_int(channels.subscribers(name))
            for name in args[2:])
    if sub == b"NUMPAT":
        return encode_int(server.channels.pattern_count())
    raise ReplyError("ERR unknown subcommand or wrong number of arguments "
                     "for '%s'. Try PUBSUB HELP."
                     % args[1].decode("utf-8", "replace")[:128])


# ## Commands: the connection #################################################

def cmd_ping(server, conn, args):
    if len(args) > 2:
        raise _wrong_arity(b"ping")
    if conn.subscribed and not conn.resp3:      # a subscriber's PING
        return encode_bulks([b"pong", args[1] if len(args) == 2 else b""])
    return PONG if len(args) == 1 else encode_bulk(args[1])


def cmd_echo(server, conn, args):
    return encode_bulk(args[1])


def cmd_quit(server, conn, args):
    conn.closing = True
    return OK


def cmd_reset(server, conn, args):
    server.end_transaction(conn)
    server.unsubscribe_all(conn)
    _set_protocol(conn, False)
    conn.name = b""
    server.deauthenticate(conn)
    return b"+RESET\r\n"


def _set_protocol(conn, resp3):
    conn.resp3 = resp3
    conn.null_bulk = RESP3_NULL if resp3 else RESP2_NULL_BULK
    conn.null_array = RESP3_NULL if resp3 else RESP2_NULL_ARRAY


def cmd_hello(server, conn, args):
    resp3 = conn.resp3
    if len(args) > 1:
        version = parse_integer(args[1])
        if version is None:
            raise ReplyError(
                "ERR Protocol version is not an integer or out of range")
        if version not in (2, 3):
            raise ReplyError("NOPROTO unsupported protocol version")
        resp3 = version == 3
    name, auth, i = None, None, 2
    while i < len(args):
        option = args[i].upper()
        if option == b"AUTH" and i + 2 < len(args):
            auth = args[i + 1:i + 3]
            i += 3
        elif option == b"SETNAME" and i + 1 < len(args):
            name = _client_name(args[i + 1])
            i += 2
        else:
            raise ReplyError("ERR Syntax error in HELLO option '%s'"
                             % args[i].decode("utf-8", "replace"))
    if auth is not None:
        server.authenticate(conn, *auth)
    elif not conn.authenticated:
        raise ReplyError(
            "NOAUTH HELLO must be called with the client already "
            "authenticated, otherwise the HELLO AUTH <user> <pass> option "
            "can be used to authenticate the client and select the RESP "
            "protocol version at the same time")
    if name is not None:
        conn.name = name
    _set_protocol(conn, resp3)
    return encode_map([
        (encode_bulk(b"server"), encode_bulk(b"beuss")),
        (encode_bulk(b"version"), encode_bulk(__version__.encode())),
        (encode_bulk(b"proto"), encode_int(3 if resp3 else 2)),
        (encode_bulk(b"id"), encode_int(conn.id)),
        (encode_bulk(b"mode"), encode_bulk(b"standalone")),
        (encode_bulk(b"role"), encode_bulk(b"master")),
        (encode_bulk(b"modules"), EMPTY_ARRAY),
    ], resp3)


def cmd_auth(server, conn, args):
    if len(args) > 3:
        raise ReplyError(ERR_SYNTAX)
    if len(args) == 2:
        if server.token is None:
            raise ReplyError(
                "ERR AUTH <password> called without any password configured "
                "for the default user. Are you sure your configuration is "
                "correct?")
        args = [args[0], b"default", args[1]]
    server.authenticate(conn, args[1], args[2])
    return OK


def cmd_select(server, conn, args):
    if _integer(args[1]) != 0:
        raise ReplyError("ERR DB index is out of range")
    return OK


def _client_name(name):
    if any(c < 33 or c > 126 for c in name):
        raise ReplyError("ERR Client names cannot contain spaces, newlines or "
                         "special characters.")
    return name


def cmd_client(server, conn, args):
    sub = args[1].upper()
    if sub == b"HELP":
        return _help(b"client")
    if sub == b"SETNAME":
        conn.name = _client_name(args[2])
        return OK
    if sub == b"GETNAME":
        return encode_bulk(conn.name) if conn.name else conn.null_bulk
    if sub == b"ID":
        return encode_int(conn.id)
    if sub == b"INFO":
        return _encode_text(conn, server.client_info(conn) + "\n")
    if sub == b"LIST":
        return _client_list(server, conn, args)
    if sub == b"KILL":
        return _client_kill(server, conn, args)
    attribute = args[2].upper()
    if attribute not in (b"LIB-NAME", b"LIB-VER"):
        raise ReplyError("ERR Unrecognized option '%s'"
                         % args[2].decode("utf-8", "replace"))
    if any(c < 33 or c > 126 for c in args[3]):
        raise ReplyError("ERR %s cannot contain spaces, newlines or special "
                         "characters." % args[2].decode("utf-8", "replace"))
    conn.library[attribute == b"LIB-VER"] = args[3]
    return OK


def _encode_text(conn, text):
    """A text meant for people: verbatim in RESP3, bulk in RESP2."""
    data = text.encode("utf-8", "replace")
    if conn.resp3:
        return b"=%d\r\ntxt:%s\r\n" % (len(data) + 4, data)
    return encode_bulk(data)


def _client_list(server, conn, args):
    clients = server.clients()
    if len(args) == 4 and args[2].upper() == b"TYPE":
        kind = args[3].lower()
        if kind not in (b"normal", b"pubsub", b"master", b"replica", b"slave"):
            raise ReplyError("ERR Unknown client type '%s'"
                             % args[3].decode("utf-8", "replace"))
        clients = [client for client in clients
                   if (b"pubsub" if client.subscribed else b"normal") == kind]
    elif len(args) > 3 and args[2].upper() == b"ID":
        wanted = []
        for arg in args[3:]:
            number = parse_integer(arg)
            if number is None:
                raise ReplyError("ERR Invalid client ID")
            wanted.append(number)
        by_id = {client.id: client for client in clients}
        clients = [by_id[number] for number in wanted if number in by_id]
    elif len(args) != 2:
        raise ReplyError(ERR_SYNTAX)
    return _encode_text(conn, "".join(server.client_info(client) + "\n"
                                      for client in clients))


def _client_kill(server, conn, args):
    # CLIENT KILL ip:port (the old form, which may kill the caller), or
    # filters: ID id, ADDR ip:port, LADDR ip:port, TYPE t, SKIPME yes|no.
    filters, skip_me = {}, len(args) > 3
    if len(args) == 3:
        filters[b"ADDR"] = args[2]
    else:
        for i in range(2, len(args), 2):
            option = args[i].upper()
            if i + 1 >= len(args) or option not in (
                    b"ID", b"ADDR", b"LADDR", b"TYPE", b"SKIPME", b"USER"):
                raise ReplyError(ERR_SYNTAX)
            value = args[i + 1]
            if option == b"TYPE" and value.lower() not in (
                    b"normal", b"pubsub", b"master", b"replica", b"slave"):
                raise ReplyError("ERR Unknown client type '%s'" % value.decode(
                    "utf-8", "replace"))
            if option == b"USER" and value != b"default":
                raise ReplyError("ERR No such user '%s'" % value.decode(
                    "utf-8", "replace"))
            if option == b"ID":
                number = parse_integer(value)
                if number is None or number < 1:
                    raise ReplyError("ERR client-id should be greater than 0")
            elif option == b"SKIPME":
                if value.lower() not in (b"yes", b"no"):
                    raise ReplyError(ERR_SYNTAX)
                skip_me = value.lower() == b"yes"
            filters[option] = value
    killed = 0
    for client in server.clients():
        if client is conn and skip_me:
            continue
        if b"ID" in filters and parse_integer(filters[b"ID"]) != client.id:
            continue
        if b"ADDR" in filters and _address_text(client.peer).encode() \
                != filters[b"ADDR"]:
            continue
        if b"LADDR" in filters and _address_text(_local_address(
                client.sock)).encode() != filters[b"LADDR"]:
            continue
        if b"TYPE" in filters and filters[b"TYPE"].lower() != (
                b"pubsub" if client.subscribed else b"normal"):
            continue
        server.kill(client, conn)
        killed += 1
    if len(args) == 3:
        if not killed:
            raise ReplyError("ERR No such client")
        return OK
    return encode_int(killed)


# ## Commands: introspection ##################################################

# COMMAND prints the command table: COMMAND INFO its arity, flags and queue
# positions as programs read them, COMMAND DOCS its summaries and arguments
# (in Redis's docs notation, parsed on first use) for redis-cli's HELP and
# hints. CONFIG GET prints the settings table, INFO the server's state.

def cmd_command(server, conn, args):
    if len(args) == 1:
        return _command_info(conn, COMMAND_ROWS)
    sub = args[1].upper()
    if sub == b"HELP":
        return _help(b"command")
    if sub == b"COUNT":
        return encode_int(len(COMMAND_ROWS))
    if sub == b"LIST":
        if len(args) > 2:
            raise ReplyError(ERR_SYNTAX)    # FILTERBY is not offered
        return encode_bulks([command.name for command in COMMAND_ROWS])
    names = [arg.lower() for arg in args[2:]] or [
        command.name for command in COMMAND_ROWS]
    if sub == b"DOCS":
        return encode_map([(encode_bulk(name), _command_docs(conn, COMMANDS[name]))
                           for name in names if name in COMMANDS], conn.resp3)
    return _command_info(conn, [COMMANDS.get(name, name) for name in names])


def _command_docs(conn, command):
    pairs = [(encode_bulk(b"summary"), encode_bulk(command.summary.encode())),
             (encode_bulk(b"since"), encode_bulk(command.since.encode())),
             (encode_bulk(b"group"), encode_bulk(command.group.encode()))]
    if command.arguments:
        pairs.append((encode_bulk(b"arguments"), _encode_arguments(
            conn, _parse_arguments(command.arguments))))
    if command.subcommands:
        pairs.append((encode_bulk(b"subcommands"), encode_map(
            [(encode_bulk(sub.name), _command_docs(conn, sub))
             for sub in command.subcommands.values()], conn.resp3)))
    return encode_map(pairs, conn.resp3)


_ARGUMENT_TYPES = {
    "key": "key", "source": "key", "destination": "key",
    "timeout": "double", "pattern": "pattern",
    "count": "integer", "numkeys": "integer", "index": "integer",
    "start": "integer", "stop": "integer", "rank": "integer",
    "num-matches": "integer", "len": "integer", "cursor": "integer",
    "client-id": "integer", "protover": "integer",
}


def _parse_arguments(text):
    """Arguments in Redis's docs notation ("key [COUNT count]", "LEFT|RIGHT",
    "element...") as dicts in COMMAND DOCS's shape."""
    words, depth, word = [], 0, ""
    for c in text + " ":
        if c == " " and depth == 0:
            if word:
                words.append(word)
            word = ""
            continue
        depth += (c == "[") - (c == "]")
        word += c
    arguments = []
    for word in words:
        optional = word.startswith("[")
        if optional:
            word = word[1:-1]
        inner = _parse_arguments(word) if " " in word else None
        if inner and inner[0]["type"] == "pure-token" and len(inner) > 1:
            token = inner.pop(0)["token"]       # [COUNT count], [AUTH u p]
            argument = dict(inner[0], token=token) if len(inner) == 1 else {
                "name": token.lower(), "type": "block", "token": token,
                "arguments": inner}
        elif inner:
            argument = {"name": inner[0]["name"], "type": "block",
                        "arguments": inner}
        elif "|" in word:
            argument = {"name": word.lower().replace("|", "-"),
                        "type": "oneof", "arguments": [
                            _token_argument(choice)
                            for choice in word.split("|")]}
        elif word.isupper():
            argument = _token_argument(word)
        else:
            name = word.rstrip(".")
            argument = {"name": name, "type": _ARGUMENT_TYPES.get(
                name, "string")}
            if word.endswith("..."):
                argument["flags"] = ["multiple"]
        if optional:
            argument["flags"] = argument.get("flags", []) + ["optional"]
        arguments.append(argument)
    return arguments


def _token_argument(word):
    return {"name": word.lower(), "type": "pure-token", "token": word}


def _encode_flags(conn, flags):
    """A set of status strings, as COMMAND's replies give flags."""
    return (b"~" if conn.resp3 else b"*") + b"%d\r\n" % len(flags) + b"".join(
        b"+%s\r\n" % flag.encode() for flag in flags)


def _encode_arguments(conn, arguments):
    encoded = []
    for argument in arguments:
        pairs = []
        for field in ("name", "type", "token", "flags", "arguments"):
            value = argument.get(field)
            if value is None:
                continue
            if field == "flags":
                value = _encode_flags(conn, value)
            elif field == "arguments":
                value = _encode_arguments(conn, value)
            else:
                value = encode_bulk(value.encode())
            pairs.append((encode_bulk(field.encode()), value))
        encoded.append(encode_map(pairs, conn.resp3))
    return b"*%d\r\n" % len(encoded) + b"".join(encoded)


def _command_info(conn, commands):
    """COMMAND INFO's ten fields for each command; a name that is not a
    command (bytes in place of a Command) gets a null."""
    replies = []
    for command in commands:
        if isinstance(command, bytes):
            replies.append(conn.null_bulk)
            continue
        replies.append(b"*10\r\n" + encode_bulk(command.name)
                       + encode_int(command.arity)
                       + _encode_flags(conn, command.flags)
                       + b"".join(encode_int(k) for k in command.keys)
                       + _encode_flags(conn, []) + _encode_flags(conn, [])
                       + EMPTY_ARRAY
                       + _command_info(conn, list(command.subcommands.values())))
    return b"*%d\r\n" % len(replies) + b"".join(replies)


def cmd_config(server, conn, args):
    if args[1].upper() == b"HELP":
        return _help(b"config")
    settings = server.settings()
    pairs = {}
    for pattern in args[2:]:
        match = glob_matcher(pattern.lower())
        for name, value in settings:
            if match(name):
                pairs[name] = value
    return encode_map([(encode_bulk(name), encode_bulk(value))
                       for name, value in pairs.items()], conn.resp3)


def cmd_info(server, conn, args):
    wanted = {arg.lower() for arg in args[1:]}
    if not wanted or wanted & {b"all", b"everything", b"default"}:
        wanted = None
    return encode_bulk(server.info(wanted).encode("utf-8", "replace"))


# ## The command table ########################################################

# One row per command and per subcommand; adding a command is one function
# above and one row here. The dispatch (Server._run and _run_checked)
# enforces a row's flags, COMMAND INFO prints them and COMMAND DOCS prints
# the rest, so what the server says of a command is what it does. A
# function reads its arguments' list and never changes it: the reader
# hands out one list for every copy of a repeated request.
#
# A row: name (a subcommand after its command's name and a space) |
# function (a subcommand's is its command's) | arity, as Redis counts it
# (negative: at least) | flags | positions of its queue names (first, last,
# step) | group | the Redis version that brought it | summary | arguments,
# as Redis's docs write them.
#
# The flags the dispatch enforces:
#   write       refused (MISCONF) while the store cannot write; EXEC counts
#               as a write when its transaction holds one
#   denyoom     refused (OOM) once queued messages pass --max-memory, and
#               its arguments named `element` (the messages it stores)
#               refused past --max-message-size; EXEC when its transaction
#               holds one
#   no_auth     may run before AUTH when there is a token
#   subscribed  may run in RESP2 once the connection has subscriptions
#   at-once     runs at once inside MULTI; any other command is queued
# The last two are beuss's own words for rules Redis writes into its code:
# COMMAND INFO does not print them.
_COMMAND_TABLE = """\
rpush|cmd_push|-3|write,denyoom,fast|1,1,1|list|1.0.0|Append messages to the tail of a queue|key element...
lpush|cmd_push|-3|write,denyoom,fast|1,1,1|list|1.0.0|Prepend messages to the head of a queue|key element...
rpushx|cmd_pushx|-3|write,denyoom,fast|1,1,1|list|2.2.0|Append messages to a queue only if it exists|key element...
lpushx|cmd_pushx|-3|write,denyoom,fast|1,1,1|list|2.2.0|Prepend messages to a queue only if it exists|key element...
lpop|cmd_pop|-2|write,fast|1,1,1|list|1.0.0|Take messages from the head of a queue|key [count]
rpop|cmd_pop|-2|write,fast|1,1,1|list|1.0.0|Take messages from the tail of a queue|key [count]
blpop|cmd_bpop|-3|write,noscript,blocking|1,-2,1|list|2.0.0|Take the head message of the first non-empty queue, or wait for one|key... timeout
brpop|cmd_bpop|-3|write,noscript,blocking|1,-2,1|list|2.0.0|Take the tail message of the first non-empty queue, or wait for one|key... timeout
lmpop|cmd_lmpop|-4|write|0,0,0|list|7.0.0|Take messages from the first non-empty queue|numkeys key... LEFT|RIGHT [COUNT count]
blmpop|cmd_blmpop|-5|write,blocking|0,0,0|list|7.0.0|Take messages from the first non-empty queue, or wait for some|timeout numkeys key... LEFT|RIGHT [COUNT count]
lmove|cmd_lmove|5|write,denyoom|1,2,1|list|6.2.0|Move a message from one queue to another|source destination LEFT|RIGHT LEFT|RIGHT
blmove|cmd_blmove|6|write,denyoom,noscript,blocking|1,2,1|list|6.2.0|Move a message from one queue to another, or wait for one|source destination LEFT|RIGHT LEFT|RIGHT timeout
rpoplpush|cmd_rpoplpush|3|write,denyoom|1,2,1|list|1.2.0|Move the tail message of a queue to the head of another|source destination
brpoplpush|cmd_brpoplpush|4|write,denyoom,noscript,blocking|1,2,1|list|2.2.0|Move the tail message of a queue to the head of another, or wait for one|source destination timeout
reserve|cmd_reserve|-3|write,blocking|1,-2,1|list|beuss|Hold the head message of the first non-empty queue until ACK, or wait for one; COUNT: up to count of them|key... timeout [COUNT count]
ack|cmd_ack|-2|write,fast|0,0,0|list|beuss|Remove held messages for good|id...
nack|cmd_nack|-2|write,fast|0,0,0|list|beuss|Give held messages back: at the head of their queues, after a delay (the retry schedule's unless given), or to their dead letters; UNDELIVERED: at once, the delivery not counted|id... [DELAY delay] [REASON reason] [UNDELIVERED]
touch|cmd_touch|-2|fast|0,0,0|list|beuss|Renew the lease of held messages|id...
defer|cmd_defer|-4|write,denyoom|1,1,1|list|beuss|Add messages to the tail of a queue once a delay has passed|key delay element...
redrive|cmd_redrive|-2|write|1,1,1|list|beuss|Move dead letters back to the tail of their queue, as new messages|key [count]
put|cmd_put|-3|write,denyoom,fast|1,1,1|list|beuss|Append a message to the tail of a queue; with ID, only if that id was not put on the queue within its dedup-window (0 then); with TTL, to its dead letters if not delivered within ttl seconds|key element [ID id] [TTL ttl]
queue|cmd_queue|-2||0,0,0|list|beuss|About a queue's own settings|
queue set||-5|write|2,2,1|list|beuss|Change a queue's settings: max-length, max-bytes, overflow, dedup-window, rate, ttl|key setting value [setting value ...]
queue get||3|readonly|2,2,1|list|beuss|A queue's settings, as pairs|key
queue reset||3|write|2,2,1|list|beuss|Put a queue's settings back to their defaults|key
queue help||2||0,0,0|list|beuss|What QUEUE's subcommands do|
why|cmd_why|-2|readonly|1,1,1|list|beuss|Why the messages of a dead-letter queue died: deliveries, when, why|key [start stop]
pause|cmd_pause|-2|write,fast|1,-1,1|list|beuss|Stop delivering from queues, which still take messages; how many were not paused|key...
resume|cmd_pause|-2|write,fast|1,-1,1|list|beuss|Deliver from paused queues again, their waiters first; how many were paused|key...
llen|cmd_llen|2|readonly,fast|1,1,1|list|1.0.0|The number of messages in a queue|key
lrange|cmd_lrange|4|readonly|1,1,1|list|1.0.0|Messages of a queue, without taking them|key start stop
lindex|cmd_lindex|3|readonly|1,1,1|list|1.0.0|The message at an index of a queue|key index
lpos|cmd_lpos|-3|readonly|1,1,1|list|6.0.6|The indexes of a message in a queue|key element [RANK rank] [COUNT num-matches] [MAXLEN len]
lset|cmd_lset|4|write,denyoom|1,1,1|list|1.0.0|Replace the message at an index of a queue|key index element
linsert|cmd_linsert|5|write,denyoom|1,1,1|list|2.2.0|Insert a message before or after another|key BEFORE|AFTER pivot element
ltrim|cmd_ltrim|4|write|1,1,1|list|1.0.0|Keep only a range of a queue's messages|key start stop
lrem|cmd_lrem|4|write|1,1,1|list|1.0.0|Remove copies of a message from a queue|key count element
del|cmd_del|-2|write|1,-1,1|generic|1.0.0|Delete queues|key...
exists|cmd_exists|-2|readonly,fast|1,-1,1|generic|1.0.0|How many of the queues exist|key...
type|cmd_type|2|readonly,fast|1,1,1|generic|1.0.0|The type of a name: list or none|key
keys|cmd_keys|2|readonly|0,0,0|generic|1.0.0|Queue names that match a pattern|pattern
scan|cmd_scan|-2|readonly|0,0,0|generic|2.8.0|Iterate over queue names|cursor [MATCH pattern] [COUNT count] [TYPE type]
dbsize|cmd_dbsize|1|readonly,fast|0,0,0|server|1.0.0|The number of queues|
flushdb|cmd_flush|-1|write|0,0,0|server|1.0.0|Delete every queue|[ASYNC|SYNC]
flushall|cmd_flush|-1|write|0,0,0|server|1.0.0|Delete every queue|[ASYNC|SYNC]
multi|cmd_multi|1|noscript,loading,stale,fast,at-once|0,0,0|transactions|1.2.0|Start a transaction|
exec|cmd_exec|1|noscript,loading,stale,at-once|0,0,0|transactions|1.2.0|Run the commands of a transaction|
discard|cmd_discard|1|noscript,loading,stale,fast,at-once|0,0,0|transactions|2.0.0|Forget the commands of a transaction|
watch|cmd_watch|-2|noscript,loading,stale,fast,at-once|1,-1,1|transactions|2.2.0|Run the next transaction only if these queues do not change first|key...
unwatch|cmd_unwatch|1|noscript,loading,stale,fast|0,0,0|transactions|2.2.0|Forget the watched queues|
subscribe|cmd_subscribe|-2|pubsub,noscript,loading,stale,subscribed|0,0,0|pubsub|2.0.0|Listen to channels|channel...
unsubscribe|cmd_unsubscribe|-1|pubsub,noscript,loading,stale,subscribed|0,0,0|pubsub|2.0.0|Stop listening to channels|[channel...]
psubscribe|cmd_subscribe|-2|pubsub,noscript,loading,stale,subscribed|0,0,0|pubsub|2.0.0|Listen to the channels that match patterns|pattern...
punsubscribe|cmd_unsubscribe|-1|pubsub,noscript,loading,stale,subscribed|0,0,0|pubsub|2.0.0|Stop listening to patterns|[pattern...]
publish|cmd_publish|3|pubsub,loading,stale,fast|0,0,0|pubsub|2.0.0|Send a message to the subscribers of a channel|channel message
ssubscribe|cmd_subscribe|-2|pubsub,noscript,loading,stale,subscribed|1,-1,1|pubsub|7.0.0|Listen to sharded channels|shardchannel...
sunsubscribe|cmd_unsubscribe|-1|pubsub,noscript,loading,stale,subscribed|1,-1,1|pubsub|7.0.0|Stop listening to sharded channels|[shardchannel...]
spublish|cmd_spublish|3|pubsub,loading,fast|1,1,1|pubsub|7.0.0|Send a message to the subscribers of a sharded channel|shardchannel message
pubsub|cmd_pubsub|-2||0,0,0|pubsub|2.8.0|About channels and subscribers|
pubsub channels||-2|pubsub,loading,stale|0,0,0|pubsub|2.8.0|Channels that have subscribers|[pattern]
pubsub numsub||-2|pubsub,loading,stale|0,0,0|pubsub|2.8.0|How many subscribers channels have|[channel...]
pubsub numpat||2|pubsub,loading,stale|0,0,0|pubsub|2.8.0|How many patterns have subscribers|
pubsub shardchannels||-2|pubsub,loading,stale|0,0,0|pubsub|7.0.0|Sharded channels that have subscribers|[pattern]
pubsub shardnumsub||-2|pubsub,loading,stale|0,0,0|pubsub|7.0.0|How many subscribers sharded channels have|[shardchannel...]
pubsub help||2|loading,stale|0,0,0|pubsub|6.2.0|What PUBSUB's subcommands do|
ping|cmd_ping|-1|fast,subscribed|0,0,0|connection|1.0.0|Check that the server answers|[message]
echo|cmd_echo|2|fast|0,0,0|connection|1.0.0|Answer the message|message
quit|cmd_quit|-1|noscript,loading,stale,fast,no_auth,subscribed,at-once|0,0,0|connection|1.0.0|Close the connection|
reset|cmd_reset|1|noscript,loading,stale,fast,subscribed,at-once|0,0,0|connection|6.2.0|Reset the connection: no transaction, no subscriptions, RESP2|
hello|cmd_hello|-1|noscript,loading,stale,fast,no_auth|0,0,0|connection|6.0.0|Choose the protocol, and describe the server|[protover [AUTH username password] [SETNAME clientname]]
auth|cmd_auth|-2|noscript,loading,stale,fast,no_auth|0,0,0|connection|1.0.0|Authenticate the connection|[username] password
select|cmd_select|2|loading,stale,fast|0,0,0|connection|1.0.0|Choose the database: only 0 exists|index
client|cmd_client|-2||0,0,0|connection|2.4.0|About client connections|
client setname||3|noscript,loading,stale|0,0,0|connection|2.6.9|Name the connection|connection-name
client getname||2|noscript,loading,stale|0,0,0|connection|2.6.9|The connection's name|
client id||2|noscript,loading,stale|0,0,0|connection|5.0.0|The connection's id|
client info||2|noscript,loading,stale|0,0,0|connection|6.2.0|What the server knows of this connection|
client list||-2|noscript,loading,stale|0,0,0|connection|2.4.0|What the server knows of each connection|[TYPE NORMAL|PUBSUB] [ID client-id...]
client kill||-3|noscript,loading,stale|0,0,0|connection|2.4.0|Close connections|[ID client-id] [ADDR ip:port] [LADDR ip:port] [TYPE NORMAL|PUBSUB] [SKIPME YES|NO]
client setinfo||4|noscript,loading,stale|0,0,0|connection|7.2.0|Tell the server the client library's name or version|LIB-NAME|LIB-VER value
client help||2|loading,stale|0,0,0|connection|5.0.0|What CLIENT's subcommands do|
command|cmd_command|-1|loading,stale|0,0,0|server|2.8.13|What the server knows of its commands|
command count||2|loading,stale|0,0,0|server|2.8.13|The number of commands|
command list||-2|loading,stale|0,0,0|server|7.0.0|The names of the commands|
command docs||-2|loading,stale|0,0,0|server|7.0.0|How commands are used, for people|[command-name...]
command info||-2|loading,stale|0,0,0|server|2.8.13|How commands are called, for programs|[command-name...]
command help||2|loading,stale|0,0,0|server|5.0.0|What COMMAND's subcommands do|
config|cmd_config|-2||0,0,0|server|2.0.0|About the server's settings|
config get||-3|loading,stale|0,0,0|server|2.0.0|Settings that match patterns|parameter...
config help||2|loading,stale|0,0,0|server|5.0.0|What CONFIG's subcommands do|
info|cmd_info|-1|loading,stale|0,0,0|server|1.0.0|The server's state, as text|[section...]
"""
_UNPRINTED_FLAGS = {"subscribed", "at-once"}


class Command:
    """A row of the command table, as the dispatch reads it."""

    __slots__ = ("name", "function", "arity", "flags", "keys", "group",
                 "since", "summary", "arguments", "subcommands", "write",
                 "denyoom", "no_auth", "subscribed", "at_once", "messages",
                 "dispatch")

    def __init__(self, row):
        (name, function, arity, flags, keys, self.group, self.since,
         self.summary, self.arguments) = row.split("|", 8)
        self.name = name.replace(" ", "|").encode()   # b"client|list"
        self.function = globals()[function] if function else None
        self.arity = int(arity)
        flags = flags.split(",") if flags else []
        self.flags = [flag for flag in flags if flag not in _UNPRINTED_FLAGS]
        self.keys = [int(key) for key in keys.split(",")]
        self.subcommands = {}       # SUBCOMMAND (upper case) -> Command
        self.write = "write" in flags
        self.denyoom = "denyoom" in flags
        self.no_auth = "no_auth" in flags
        self.subscribed = "subscribed" in flags
        self.at_once = "at-once" in flags
        # Where the messages a denyoom command stores begin (0: none).
        words = ("%s %s" % (name, self.arguments)).split()
        self.messages = next((i for i, word in enumerate(words)
                              if word.rstrip(".") == "element"), 0) \
            if self.denyoom else 0


def _help(name):
    """The HELP of a command made of subcommands, from its rows."""
    command = COMMANDS[name]
    lines = [b"%s <subcommand> [<arg> [value] [opt] ...]. Subcommands are:"
             % name.upper()]
    for sub in command.subcommands.values():
        if sub.name.endswith(b"|help"):
            continue
        lines.append(("%s %s" % (sub.name.partition(b"|")[2].decode().upper(),
                                 sub.arguments)).strip().encode())
        lines.append(b"    " + sub.summary.encode() + b".")
    lines += [b"HELP", b"    Print this help."]
    return b"*%d\r\n" % len(lines) + b"".join(b"+%s\r\n" % line
                                              for line in lines)


def _subcommand(command, args):
    """The row of the subcommand args name, its name and arity checked as
    Redis checks them before running or queueing it; command itself when
    args name none."""
    if not command.subcommands or len(args) < 2:
        return command
    sub = command.subcommands.get(args[1].upper())
    if sub is None:
        raise ReplyError("ERR unknown subcommand '%s'. Try %s HELP." % (
            args[1].decode("utf-8", "replace")[:128],
            command.name.upper().decode("utf-8", "replace")))
    if (len(args) != sub.arity) if sub.arity > 0 else (len(args) < -sub.arity):
        raise _wrong_arity(sub.name)
    return sub


def _load_commands():
    """{name: Command} in lower and upper case, and the commands in the
    table's order."""
    commands, rows = {}, []
    for line in _COMMAND_TABLE.splitlines():
        command = Command(line)
        container, _, sub = command.name.partition(b"|")
        if sub:
            parent = commands[container]
            command.function = parent.function
            parent.subcommands[sub.upper()] = command
            continue
        commands[command.name] = commands[command.name.upper()] = command
        rows.append(command)
    for command in rows:
        # What Server._run reads of every request's row, in one tuple; the
        # route is 0 to call the function, 1 to _admit first, 2 to take
        # the checked path (a command made of subcommands).
        route = 2 if command.subcommands else 1 if command.denyoom else 0
        command.dispatch = (command.function, command.arity, command.name,
                            route)
    return commands, rows


COMMANDS, COMMAND_ROWS = _load_commands()


# ## Settings #################################################################
#
# One row per setting of the server; adding a setting is one row here. A row
# makes SERVE's option (flag and help), the environment variable read when
# the flag is not given, the default, the parser of both, the keyword of
# Server(address, **settings) (the row's name; host and port make the
# address) and the name CONFIG GET shows it under. A value comes from the
# flag, else the environment, else the default.

class Setting:
    """A row of the settings table."""

    __slots__ = ("name", "flag", "env", "default", "parse", "config",
                 "metavar", "help")

    def __init__(self, name, flag, env, default, parse, config, metavar,
                 help):
        self.name, self.flag, self.env, self.default = name, flag, env, default
        self.parse, self.config, self.metavar = parse, config, metavar
        self.help = help            # None for metavar: a switch


class _BadValue(ValueError):
    """A parser's refusal that says what a good value is."""


def _whole_in(value, low, high, what):
    """A whole number from low to high (None: no bound), or _BadValue
    saying which numbers are."""
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low or (high is not None and number > high):
        raise _BadValue("%r is not %s: a whole number from %d%s" % (
            value, what, low, " to %d" % high if high is not None else " up"))
    return number


def _port(value):
    return _whole_in(value, 0, 65535, "a port")


def _positive(value):
    return _whole_in(value, 1, None, "a count")


def _whole(value):
    return _whole_in(value, 0, None, "a count")


_SIZE_UNITS = {"k": 1000, "kb": 1024, "m": 1000 ** 2, "mb": 1024 ** 2,
               "g": 1000 ** 3, "gb": 1024 ** 3, "t": 1000 ** 4,
               "tb": 1024 ** 4}


def _bytes(value):
    """A size in bytes: 1000, 10k (1000s), 10kb (1024s), 512mb, 2gb, 1tb."""
    text = value.strip().lower()
    number = text.rstrip("kmgtb")
    unit = _SIZE_UNITS.get(text[len(number):], 1 if number == text else None)
    if unit is None or not number.isdigit():
        raise _BadValue("%r is not a size: bytes, or a number with k, kb, "
                        "m, mb, g, gb, t or tb (1000s, or 1024s with b)"
                        % value)
    return int(number) * unit


def _message_size(value):
    size = _bytes(value)
    if not 1 <= size <= MAX_BULK_LENGTH:
        raise _BadValue("a message size is from 1 to %d bytes"
                        % MAX_BULK_LENGTH)
    return size


_TIME_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value):
    """Seconds: 30, 0.5, or times with units, summed: 500ms, 30s, 5m, 2h,
    1d, 1h30m."""
    text = str(value).strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        import re               # only for units: it costs a start 2 ms
        parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)", text)
        seconds = float("nan")
        if parts and "".join(number + unit for number, unit in parts) == text:
            seconds = sum(float(number) * _TIME_UNITS[unit]
                          for number, unit in parts)
    if seconds != seconds or seconds < 0:
        raise _BadValue("%r is not a time: seconds, or 500ms, 30s, 5m, 2h, "
                        "1d, 1h30m" % value)
    if seconds > MAX_DELAY:
        raise _BadValue("%r is too long: at most %d seconds (about 31 "
                        "years)" % (value, MAX_DELAY))
    return seconds


def _fsync_policy(value):
    if value not in FSYNC_POLICIES:
        raise _BadValue("%r is not one of %s" % (value,
                                                 ", ".join(FSYNC_POLICIES)))
    return value


def _yes(value):
    text = str(value).lower()
    if text in ("1", "yes", "true", "on"):
        return True
    if text in ("0", "no", "false", "off"):
        return False
    raise ValueError(value)


def _http_address(value):
    """(host or None, port) from [HOST:]PORT; [::1]:8080 for IPv6."""
    host, _, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or None, _port(port)


_SELECTORS = ("epoll", "kqueue", "devpoll", "poll", "select")


def _selector(value):
    """A selectors class by its short name: epoll, kqueue, devpoll, poll
    or select, those the system has."""
    here = [name for name in _SELECTORS
            if hasattr(selectors, name.capitalize() + "Selector")]
    if value not in _SELECTORS:
        raise _BadValue("%r is not a selector: %s" % (value, ", ".join(
            _SELECTORS)))
    if value not in here:
        raise _BadValue("%s is not available on this system, which has %s"
                        % (value, ", ".join(here)))
    return getattr(selectors, value.capitalize() + "Selector")


SETTINGS = [Setting(*row) for row in (
    # name, flag, environment, default, parser, CONFIG GET name, metavar,
    # help (SERVE --help adds the environment variable)
    ("host", "--host", "BHOST", DEFAULT_HOST, str, "bind", "ADDRESS",
     "address to listen on; 127.0.0.1 (0.0.0.0 or :: for every interface)"),
    ("port", "--port", "BPORT", DEFAULT_PORT, _port, "port", "PORT",
     "port to listen on; %d" % DEFAULT_PORT),
    ("max_message_size", "--max-message-size", "BMAXMESSAGESIZE",
     DEFAULT_MAX_MESSAGE_SIZE, _message_size, "max-message-size", "BYTES",
     "largest message accepted; %d" % DEFAULT_MAX_MESSAGE_SIZE),
    ("max_clients", "--max-clients", "BMAXCLIENTS", DEFAULT_MAX_CLIENTS,
     _positive, "maxclients", "N",
     "most client connections at once; %d" % DEFAULT_MAX_CLIENTS),
    ("max_http_clients", "--max-http-clients", "BMAXHTTPCLIENTS",
     DEFAULT_MAX_HTTP_CLIENTS, _positive, "max-http-clients", "N",
     "most status page connections at once, apart from --max-clients; %d"
     % DEFAULT_MAX_HTTP_CLIENTS),
    ("max_memory", "--max-memory", "BMAXMEMORY", None, _bytes, "maxmemory",
     "BYTES", "memory queued messages may take; pushes past it are refused; "
     "half of the machine's; 0: no bound; 512mb, 2gb ... understood"),
    ("max_input", "--max-input", "BMAXINPUT", None, _bytes, "max-input",
     "BYTES", "unread input a client may send ahead; 32mb, or the message "
     "size + 1mb"),
    ("lease", "--lease", "BLEASE", 0, _duration, "lease", "SECONDS",
     "a reserved message not acknowledged (or touched) within SECONDS goes "
     "back to its queue; 0: never; a consumer on a Redis: %s"
     % _number_text(DEFAULT_SCRIPT_LEASE) + "s"),
    ("max_deliveries", "--max-deliveries", "BMAXDELIVERIES",
     DEFAULT_MAX_DELIVERIES, _whole, "max-deliveries", "N",
     "a message given back after N deliveries goes to <queue>.dead; %d; "
     "0: never" % DEFAULT_MAX_DELIVERIES),
    ("retry_delay", "--retry-delay", "BRETRYDELAY", DEFAULT_RETRY_DELAY,
     _duration, "retry-delay", "SECONDS", "a message that failed (NACK, a "
     "lease that ran out) is ready again after this, doubled at each "
     "failure; 1s; 0: at once"),
    ("retry_max_delay", "--retry-max-delay", "BRETRYMAXDELAY",
     DEFAULT_RETRY_MAX_DELAY, _duration, "retry-max-delay", "SECONDS",
     "the longest wait between two deliveries; 5m"),
    ("data", "--data", "BDATA", None, str, "data", "FILE",
     "keep the queues in this SQLite file, so that they outlive a restart; "
     "none: memory only"),
    ("fsync", "--fsync", "BFSYNC", "everysec", _fsync_policy, "appendfsync",
     "POLICY", "when the file is synced to disk: always, everysec or no; "
     "everysec"),
    ("token", "--token", "BTOKEN", None, str, "requirepass", "TOKEN",
     "clients must AUTH with it"),
    ("protected_mode", "--no-protected-mode", "BPROTECTEDMODE", True, _yes,
     "protected-mode", None, "listen beyond loopback without a token"),
    ("tls_cert", "--tls-cert", "BTLSCERT", None, str, "tls-cert-file",
     "FILE", "serve TLS with this certificate"),
    ("tls_key", "--tls-key", "BTLSKEY", None, str, "tls-key-file", "FILE",
     "... and this private key"),
    ("http", "--http", "BHTTP", None, _http_address, "http", "[HOST:]PORT",
     "serve the status page, /metrics, /status.json and /healthz over HTTP "
     "here (the host defaults to --host's); off unless given"),
    ("selector", "--selector", "BSELECTOR", None, _selector, "selector",
     "NAME", "how the loop waits for sockets: epoll, kqueue, devpoll, poll "
     "or select; the best the system has"),
)]
# Server's keywords and their defaults: every setting but the address.
SERVER_SETTINGS = {setting.name: setting.default for setting in SETTINGS
                   if setting.name not in ("host", "port")}
# Where Lua scripts stand in for RESERVE (a Redis), the consumer keeps the
# lease and the retry schedule: the Client's keywords, GET's and ON's flags.
_SCRIPT_SETTINGS = ("lease", "max_deliveries", "retry_delay",
                    "retry_max_delay")


# A queue's own settings (QUEUE SET), one row each, read by the server, the
# Lua on Redis (through the queue's "settings" companion, as text), the
# Client and the command line; a value is kept as the text its parser
# reads back, and a queue holds only those not at their default.

_RATE_UNITS = {"s": 1, "m": 60, "h": 3600}


def _rate_setting(value):
    """A rate as its text: 10/s, 2.5/m, 100/h, or 0 for none."""
    count, _, unit = value.strip().lower().partition("/")
    try:
        number = float(count)
    except ValueError:
        number = float("nan")
    if value.strip() == "0":
        return "0"
    if unit not in _RATE_UNITS or not 0 < number < float("inf"):
        raise _BadValue("%r is not a rate: a number of deliveries a second, "
                        "minute or hour (10/s, 2.5/m, 100/h), or 0 for none"
                        % value)
    return "%s/%s" % (_number_text(number), unit)


def _rate_interval(text):
    """The seconds between two deliveries at rate text (10/s: 0.1)."""
    count, _, unit = text.partition("/")
    return _RATE_UNITS[unit] / float(count)


def _overflow(value):
    if value not in ("reject", "drop-oldest", "drop-newest"):
        raise _BadValue("%r is not reject, drop-oldest or drop-newest"
                        % value)
    return value


QUEUE_SETTINGS = collections.OrderedDict((row[0], row[1:]) for row in (
    # name, default, parser
    ("max-length", 0, _whole),
    ("max-bytes", 0, _bytes),
    ("overflow", "reject", _overflow),
    ("dedup-window", 300.0, _duration),
    ("rate", "0", _rate_setting),
    ("ttl", 0.0, _duration),
))


def _queue_settings(words, settings=None):
    """{setting: value} from words (name value ...) on top of settings,
    those at their default left out; ReplyError naming a bad one."""
    if len(words) % 2:
        raise ReplyError(ERR_SYNTAX)
    settings = dict(settings or {})
    for name, text in zip(words[::2], words[1::2]):
        name = _arg(name).decode("utf-8", "replace").lower()
        if name not in QUEUE_SETTINGS:
            raise ReplyError("ERR no queue setting %r: the settings are %s" % (
                name, ", ".join(QUEUE_SETTINGS)))
        default, parse = QUEUE_SETTINGS[name]
        try:
            value = parse(_arg(text).decode("utf-8", "replace"))
        except ValueError as exc:
            raise ReplyError("ERR %s: %s" % (name, exc))
        settings[name] = value
        if value == default:
            del settings[name]
    return settings


def _queue_value(value):
    """A queue setting's value as QUEUE GET shows it: a time as 5m."""
    if isinstance(value, float):
        return _duration_text(value) if value else "0"
    return str(value)


def _queue_settings_text(settings):
    return " ".join("%s %s" % (name, _queue_value(settings[name]))
                    for name in QUEUE_SETTINGS if name in settings)


def _setting(value, flag, env_name, default, parse=str):
    """A setting: the value given (by flag), else the environment's, else
    the default. A bad value raises ValueError naming where it came from."""
    source = flag
    if value is None:
        value, source = os.environ.get(env_name), env_name
    if value is None or value == "":
        return default
    try:
        return parse(value)
    except _BadValue as exc:
        raise ValueError("%s: %s" % (source, exc))
    except ValueError:
        raise ValueError("%s: %r is not a valid value" % (source, value))


def _setting_of(name, value, default=None):
    """The setting of the table's row name, for a Client or the command
    line: value, else the environment's, else default or the row's."""
    row = next(setting for setting in SETTINGS if setting.name == name)
    return _setting(value, row.flag, row.env, row.default if default is None
                    else default, row.parse)


def _setting_text(value):
    """A setting's value as CONFIG GET shows it."""
    if value is None:
        return ""
    if value is True or value is False:
        return "yes" if value else "no"
    if isinstance(value, float):
        return _number_text(value)
    if isinstance(value, type):         # a selector class
        return value.__name__[:-len("Selector")].lower()
    if isinstance(value, tuple):        # an address
        return "%s:%d" % value[:2]
    return str(value)


# ## The status page: HTML, metrics, JSON and health over HTTP ###############
#
# With --http the loop also answers HTTP/1.1 on a port of its own, one
# request a connection: "/" a page with a row and a chart for each queue
# that matters most (drawn by the server as SVG, refreshed by the browser
# every few seconds, no JavaScript), "/metrics" Prometheus's text format,
# "/status.json" the same numbers for scripts, and "/healthz" 200 while the
# store can write (503 while it answers MISCONF). With a token, every path
# but /healthz wants it (Authorization: Bearer, or Basic with the token as
# password).
#
# Watching the bus must never stop it, whatever the number of queues or of
# readers:
#
# - The numbers come from a _Snapshot, made at most once a second and
#   shared by every reader of that second; it is made STATUS_SLICE queues a
#   pass, as a chore (Server._chores), so ten thousand queues cost the loop
#   a few milliseconds a pass, never a freeze.
# - Each answer (a _Body) is rendered from the snapshot a slice a pass too,
#   once for every reader that asks the same thing in the same second, and
#   sent from those shared chunks: a reader costs no copy of it.
# - A client that takes no byte for HTTP_TIMEOUT seconds, or whose exchange
#   lasts HTTP_MAX_EXCHANGE, is closed at housekeeping; a request is at most
#   HTTP_MAX_REQUEST bytes; --max-http-clients bounds the connections, apart
#   from --max-clients, so no HTTP traffic can shut out a RESP client.
# - The page shows PAGE_QUEUES queues, those with the most backlog, dead
#   letters and age, and says how many it left out (?queue=NAME shows one);
#   /status.json gives JSON_PAGE queues a page (?page=N) and their history
#   only when asked (?history=1); /metrics gives every series, as
#   Prometheus needs. Names are escaped wherever they go.

_QueueRow = collections.namedtuple("_QueueRow", (
    "name paused ready bytes held deferred dead waiting busy "
    "oldest_hold_seconds in_per_second out_per_second oldest_age_seconds "
    "pushed delivered acknowledged given_back dead_lettered leases_expired "
    "consumers max_length max_bytes settings"))


def _consumer_names(queues, name, most=5):
    """The names (CLIENT SETNAME) of a queue's consumers, busy ones first,
    at most `most` of each kind; "?" for one that gave none."""
    busy, waiting = queues.owners(name)
    return tuple((conn.name.decode("ascii", "replace") or "?", "busy")
                 for conn in busy[:most]) + tuple(
        (conn.name.decode("ascii", "replace") or "?", "waiting")
        for conn in waiting[:most])


def _queue_row(queues, name, clock):
    ready, size, waiting, held, deferred = queues.sizes(name)
    counts = queues.counts.get(name)
    rates = counts.rates(clock, ready) if counts else (0.0, 0.0)
    busy, oldest_hold = queues.consumers(name, clock)
    return _QueueRow(
        name, int(name in queues.paused), ready, size, held, deferred,
        queues.length(dead_letters(name)),
        waiting, busy, round(oldest_hold), round(rates[0], 2),
        round(rates[1], 2),
        round(queues.oldest_age(name, clock)),
        counts.pushed if counts else 0,
        counts.delivered(ready) if counts else 0,
        counts.acknowledged if counts else 0,
        counts.given_back if counts else 0,
        counts.dead_lettered if counts else 0,
        counts.expired if counts else 0,
        _consumer_names(queues, name) if busy or waiting else (),
        queues.bounded.get(name, (0,))[0],
        queues.bounded.get(name, (0, 0))[1],
        _queue_settings_text(queues.settings.get(name, {})))


def _importance(row):
    # The page's order: backlog, then dead letters, then age; then names.
    return (-(row.ready + row.held + row.deferred), -row.dead,
            -row.oldest_age_seconds, row.name)


class _Snapshot:
    """The status page's numbers at one moment, made a slice a pass."""

    def __init__(self, server):
        self.server = server
        self.made = time.monotonic()
        self.head = server.status_head()
        # Dead letters count once: in their queue's row, never in a row of
        # their own, so a sum over the rows of any column counts each
        # message once.
        names = dict.fromkeys(
            name[:-len(b".dead")] if name.endswith(b".dead") else name
            for name in server.queues.active_names())
        self.names = list(names)
        self.channel_names = list(server.published)
        self.rows, self.channels = [], []
        self.done = False
        self.bodies = {}            # what was asked -> _Body
        self._at = self._channel_at = 0
        self._keys = []             # the rows' order (_importance), in step
        # The forms of pages made from it carry this, so that an action
        # comes from this server's own page.
        self.nonce = os.urandom(12).hex()
        server.nonces.append(self.nonce)

    def step(self):
        """One slice: queues, then channels, then the order; True once
        the snapshot is whole."""
        server, clock = self.server, time.monotonic()
        if self._at < len(self.names):
            queues, budget = server.queues, STATUS_SLICE
            while self._at < len(self.names) and budget > 0:
                row = _queue_row(queues, self.names[self._at], clock)
                self._at += 1
                # Summing a queue's bytes is a pass over its messages.
                budget -= 1 + row.ready // 10000
                if row.ready or row.held or row.deferred or row.waiting \
                        or row.dead or row.paused:
                    # Rows and their keys hold numbers and text only, so
                    # the collector soon stops looking at them: a second's
                    # ten thousand rows do not slow its full passes.
                    self.rows.append(row)
                    self._keys.append(_importance(row))
            return False
        if self._channel_at < len(self.channel_names):
            for channel in self.channel_names[
                    self._channel_at:self._channel_at + STATUS_SLICE]:
                subscribers = server.channels.subscribers(channel)
                if subscribers:
                    self.channels.append({
                        "name": _name_text(channel),
                        "subscribers": subscribers,
                        "published_per_second": round(_rate(
                            server.published_samples.get(channel, ()), clock,
                            server.published.get(channel, 0)), 2)})
            self._channel_at += STATUS_SLICE
            return False
        rows = self.rows
        self.rows = [rows[at] for at in sorted(range(len(rows)),
                                               key=self._keys.__getitem__)]
        self._keys = None
        self.channels.sort(key=lambda channel: channel["name"])
        self.done = True
        return True


def _history(queues, name, clock):
    """[[seconds ago, depth, in/s, out/s], ...] of a queue, oldest first."""
    counts = queues.counts.get(name)
    history, previous = [], None
    for sample in (counts.samples() if counts else ()):
        if previous is not None:
            seconds = max(sample[0] - previous[0], 1)
            history.append([round(clock - sample[0]), sample[1],
                            round((sample[2] - previous[2]) / seconds, 2),
                            round((sample[3] - previous[3]) / seconds, 2)])
        previous = sample
    return history


def _row_document(row, queues=None, clock=None):
    document = row._asdict()
    document["name"] = _name_text(row.name)
    words = row.settings.split()
    document["settings"] = dict(zip(words[::2], words[1::2]))
    if queues is not None:
        document["history"] = _history(queues, row.name, clock)
    return document


def _status_document(snapshot, rows, history):
    """/status.json's document for these rows (a dict)."""
    head = dict(snapshot.head)
    published = head.pop("published"), head.pop("published_per_second")
    queues, clock = snapshot.server.queues, time.monotonic()
    return {"server": head, "queues": [
        _row_document(row, queues if history else None, clock)
        for row in rows], "channels": snapshot.channels,
        "published": published[0], "published_per_second": published[1]}


class _Body:
    """One answer made from a snapshot, a slice a pass, and shared by every
    reader that asked the same of it."""

    def __init__(self, snapshot, status, kind, pieces):
        self.snapshot = snapshot    # made before the body is
        self.status, self.kind = status, kind
        self.pieces = pieces        # an iterator of str
        self.chunks = []            # bytes, about BODY_SLICE each
        self.size = 0
        self.done = False
        self.readers = []           # (_HttpConn, head only) waiting

    def step(self):
        if not self.snapshot.done:
            return False
        made, size = [], 0
        for piece in self.pieces:
            made.append(piece)
            size += len(piece)
            if size >= BODY_SLICE or len(made) >= 16:
                self._keep(made)
                return False
        self._keep(made)
        self.done = True
        for conn, head_only in self.readers:
            conn.answer(self, head_only)
        self.readers = []
        return True

    def _keep(self, made):
        if made:
            chunk = "".join(made).encode()
            self.chunks.append(chunk)
            self.size += len(chunk)


class _HttpConn:
    """One HTTP exchange: read the request, answer, close."""

    __slots__ = ("server", "sock", "data", "out", "created", "active",
                 "events")

    def __init__(self, server, sock):
        self.server, self.sock = server, sock
        self.data, self.out = b"", None
        self.created = self.active = time.monotonic()
        self.events = 0

    def __call__(self):
        if self.out is not None:
            self._send()
            return
        try:
            chunk = self.sock.recv(HTTP_MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not chunk:
            self.close()
            return
        self.data += chunk
        end = self.data.find(b"\r\n\r\n")
        if self.data[:1] in (b"*", b"$") or (
                b"\r\n" in self.data and b" HTTP/" not in self.data.split(
                    b"\r\n", 1)[0]):
            # A client of the bus on the page's port: say so at once.
            answer = _http_reply(400, "text/plain", (
                "This is the port of beuss's status page; clients of the bus "
                "connect to port %d.\n" % self.server.port).encode())
        elif end < 0 and len(self.data) <= HTTP_MAX_REQUEST:
            return
        elif end < 0 or len(self.data) > HTTP_MAX_REQUEST:
            answer = _http_reply(431, "text/plain", b"request too large\n")
        else:
            # A form's body follows its head (a POST from the page).
            length = _http_length(self.data[:end])
            if len(self.data) < end + 4 + length:
                return
            try:
                answer = _http_answer(self.server, self.data[:end],
                                      self.data[end + 4:end + 4 + length], self)
            except Exception as exc:
                _warn("internal error answering HTTP: %r" % exc)
                answer = _http_reply(500, "text/plain", b"internal error\n")
        if answer is None:          # a chore answers (an action)
            self.out = collections.deque()
            self.watch(0)
            return
        if answer.__class__ is bytes:
            self.reply(answer)
            return
        body, head_only = answer
        self.out = collections.deque()
        self.watch(0)               # nothing to read or send until it is made
        if body.done:
            self.answer(body, head_only)
        else:
            body.readers.append((self, head_only))

    def reply(self, answer):
        """Send a whole answer (bytes) and close."""
        if self.sock.fileno() < 0:
            return                  # closed meanwhile
        self.out = collections.deque([answer])
        self._send()

    def answer(self, body, head_only):
        """Send a body that is made (a chore calls this when it is)."""
        if self.out is None or self.sock.fileno() < 0:
            return                  # closed meanwhile
        self.active = time.monotonic()
        self.out.append(_http_head(body.status, body.kind, body.size))
        if not head_only:
            self.out.extend(body.chunks)
        self._send()

    def _send(self):
        out = self.out
        while out:
            piece = out[0]
            try:
                sent = self.sock.send(piece)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            if sent:
                self.active = time.monotonic()
            if sent < len(piece):
                out[0] = memoryview(piece)[sent:]
                self.watch(selectors.EVENT_WRITE)
                return
            out.popleft()
        self.close()

    def watch(self, events):
        if events != self.events:
            self.server._set_events(self, events)

    def close(self):
        if self in self.server._http_conns:
            self.server._http_conns.discard(self)
            self.watch(0)
            self.sock.close()


_HTTP_REASONS = {200: "OK", 303: "See Other", 400: "Bad Request",
                 401: "Unauthorized", 403: "Forbidden",
                 404: "Not Found", 405: "Method Not Allowed",
                 431: "Request Header Fields Too Large",
                 500: "Internal Server Error", 503: "Service Unavailable"}


def _http_head(status, kind, length, extra=""):
    return ("HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n%s\r\n" % (
                status, _HTTP_REASONS[status], kind, length, extra)).encode()


def _http_reply(status, kind, body, head=False, extra=""):
    return _http_head(status, kind, len(body), extra) + (b"" if head
                                                          else body)


HTTP_TOO_MANY = _http_reply(503, "text/plain", b"too many HTTP connections "
                            b"(--max-http-clients)\n")

_HTTP_KINDS = {"/": "text/html; charset=utf-8",
               "/metrics": "text/plain; version=0.0.4; charset=utf-8",
               "/status.json": "application/json"}


def _http_length(head):
    """The Content-Length a request's head gives (0 when none)."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            value = value.strip()
            return int(value) if value.isdigit() else HTTP_MAX_REQUEST
    return 0


def _http_answer(server, request, body=b"", conn=None):
    """The whole reply to a request (its line and headers) as bytes, or
    (a _Body, head only) for the answers made from a snapshot, or None
    when a chore answers (a page action)."""
    lines = request.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _http_reply(405, "text/plain", b"not an HTTP request\n")
    method, (target, _, query) = parts[0], parts[1].partition("?")
    if method == "POST" and target == "/action":
        return _page_action(server, lines[1:], body, conn)
    if method not in ("GET", "HEAD"):
        return _http_reply(405, "text/plain", b"GET or HEAD only\n",
                           extra="Allow: GET, HEAD\r\n")
    head = method == "HEAD"
    if target == "/healthz":
        store = server.store
        if store is not None and store.failing is not None:
            return _http_reply(503, "text/plain", ("the store cannot be "
                               "written: %s\n" % store.failing).encode(), head)
        return _http_reply(200, "text/plain", b"ok\n", head)
    if target not in _HTTP_KINDS:
        return _http_reply(404, "text/plain", b"not found\n", head)
    if server.token is not None and not _http_authorized(server, lines[1:]):
        return _http_reply(401, "text/plain", b"the token is needed\n", head,
                           'WWW-Authenticate: Basic realm="beuss"\r\n')
    from urllib.parse import parse_qs
    asked = {name: values[-1] for name, values
             in parse_qs(query, keep_blank_values=True).items()}
    page = asked.get("page", "1")
    if target == "/status.json" and not (page.isdigit() and int(page) >= 1):
        return _http_reply(400, "text/plain", b"page is a whole number, "
                           b"from 1\n", head)
    snapshot = server.snapshot()
    key = (target,) + tuple(sorted(asked.items()))
    body = snapshot.bodies.get(key)
    if body is None:
        pieces = (_metrics_pieces(snapshot) if target == "/metrics" else
                  _json_pieces(snapshot, asked) if target == "/status.json"
                  else _page_pieces(snapshot, asked))
        body = snapshot.bodies[key] = _Body(snapshot, 200, _HTTP_KINDS[target],
                                            pieces)
        server.add_chore(body)
    return body, head


# The page's actions (redrive, empty, pause, resume) are plain forms that
# POST to /action. The token guards them as it guards the page, and so that
# no other site's page can make a browser post them, each must carry the
# nonce of a page this server made in the last ten minutes, and an Origin
# (or else a Referer) that is the page's own address. Each is said on
# stderr with who asked, and answered once its change is committed, with a
# redirect to the page, which says what changed.

_ACTIONS = ("redrive", "empty", "empty-dead", "pause", "resume")


def _page_action(server, headers, body, conn):
    from urllib.parse import parse_qs, unquote_to_bytes, urlsplit
    fields = {name.lower(): value.strip() for name, _, value
              in (header.partition(":") for header in headers)}
    if server.token is not None and not _http_authorized(server, headers):
        return _http_reply(401, "text/plain", b"the token is needed\n",
                           extra='WWW-Authenticate: Basic realm="beuss"\r\n')
    origin = fields.get("origin") or fields.get("referer", "")
    form = {name: values[-1] for name, values in parse_qs(
        body.decode("latin-1"), keep_blank_values=True).items()}
    if not origin or urlsplit(origin).netloc != fields.get("host") \
            or form.get("nonce") not in server.nonces:
        return _http_reply(403, "text/plain", b"an action must come from "
                           b"this server's own page\n")
    if form.get("action") not in _ACTIONS or not form.get("queue"):
        return _http_reply(400, "text/plain", ("an action is one of %s, on "
                           "a queue\n" % ", ".join(_ACTIONS)).encode())
    try:
        peer = _address_text(conn.sock.getpeername())
    except OSError:
        peer = "?"
    # The form gives the name %-encoded, so that any bytes come back whole.
    server.add_chore(_PageAction(server, conn, form["action"],
                                 unquote_to_bytes(form["queue"]), peer))
    return None


class _PageAction:
    """One action of the page, done as a chore: a redrive MOVE_SLICE a
    pass; then, a pass later (its change committed), the answer."""

    def __init__(self, server, conn, action, name, peer):
        self.server, self.conn, self.action = server, conn, action
        self.name, self.peer = name, peer
        self.moved, self.done = 0, None

    def step(self):
        server, queues, name = self.server, self.server.queues, self.name
        text = _name_text(name)
        if self.done is None:
            try:
                if self.action == "redrive":
                    moved = queues.redrive(name, MOVE_SLICE)
                    self.moved += moved
                    if moved == MOVE_SLICE:
                        return False
                    self.done = "redrove %s of %s" % (_plural(
                        self.moved, "message"), text)
                elif self.action.startswith("empty"):
                    target = dead_letters(name) if self.action == \
                        "empty-dead" else name
                    count = queues.length(target)
                    queues.delete(target)
                    self.done = "emptied %s (%s)" % (_name_text(target),
                                                     _plural(count, "message"))
                else:
                    queues.pause(name, self.action == "pause")
                    self.done = "%sd %s" % (self.action, text)
            except StoreError as exc:
                self.conn.reply(_http_reply(503, "text/plain", (
                    "the store cannot be written: %s\n" % exc).encode()))
                return True
            _warn("status page: %s, asked by %s" % (self.done, self.peer))
            return False            # the answer once it is committed
        store = server.store
        if store is not None and store.failing is not None:
            self.conn.reply(_http_reply(503, "text/plain", (
                "%s, but the store cannot be written (%s): it waits for "
                "it\n" % (self.done, store.failing)).encode()))
            return True
        server.outcomes[server.next_outcome] = self.done
        while len(server.outcomes) > 100:
            del server.outcomes[next(iter(server.outcomes))]
        self.conn.reply(_http_reply(303, "text/plain", b"", extra=(
            "Location: /?done=%d\r\n" % server.next_outcome)))
        server.next_outcome += 1
        return True


def _http_authorized(server, headers):
    for header in headers:
        name, _, value = header.partition(":")
        if name.strip().lower() != "authorization":
            continue
        kind, _, credentials = value.strip().partition(" ")
        if kind.lower() == "bearer":
            return _same_token(credentials.strip().encode(), server.token)
        if kind.lower() == "basic":
            import base64
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True)
            except ValueError:
                return False
            return _same_token(decoded.partition(b":")[2], server.token)
    return False


def _metric_label(text):
    return text.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


_QUEUE_METRICS = [
    # (row field, metric name, type, help)
    ("paused", "beuss_queue_paused", "gauge",
     "1 while PAUSE keeps the queue from delivering."),
    ("ready", "beuss_queue_ready_messages", "gauge",
     "Messages ready in the queue."),
    ("held", "beuss_queue_held_messages", "gauge",
     "Messages reserved and not yet acknowledged."),
    ("deferred", "beuss_queue_deferred_messages", "gauge",
     "Messages set aside until they are due."),
    ("dead", "beuss_queue_dead_messages", "gauge",
     "Messages in the queue's dead letters."),
    ("max_length", "beuss_queue_max_length_messages", "gauge",
     "The most ready messages the queue holds (QUEUE SET); 0: no bound."),
    ("max_bytes", "beuss_queue_max_bytes", "gauge",
     "The most bytes of ready messages the queue holds; 0: no bound."),
    ("oldest_hold_seconds", "beuss_queue_oldest_hold_age_seconds", "gauge",
     "How long the message held longest has been held."),
    ("oldest_age_seconds", "beuss_queue_oldest_message_age_seconds", "gauge",
     "How long the oldest ready message has waited."),
    ("pushed", "beuss_queue_pushed_total", "counter",
     "Messages put on the queue."),
    ("delivered", "beuss_queue_delivered_total", "counter",
     "Messages taken or reserved from the queue."),
    ("acknowledged", "beuss_queue_acknowledged_total", "counter",
     "Reserved messages acknowledged."),
    ("given_back", "beuss_queue_given_back_total", "counter",
     "Reserved messages given back to be retried."),
    ("dead_lettered", "beuss_queue_dead_lettered_total", "counter",
     "Messages sent to the dead letters."),
    ("leases_expired", "beuss_queue_leases_expired_total", "counter",
     "Leases that ran out before an acknowledgement."),
]


def _metrics_pieces(snapshot):
    """/metrics, a few hundred lines a piece."""
    server = snapshot.head

    def metric(name, kind, help, samples):
        return "# HELP %s %s\n# TYPE %s %s\n%s" % (name, help, name, kind, "".join(
            "%s%s %r\n" % (name, labels, value) for labels, value in samples))
    yield "".join([
        metric("beuss_build_info", "gauge", "The server's version and Python.",
               [('{version="%s",python="%s",implementation="%s"}' % (
                   server["version"], server["python"],
                   server["implementation"]), 1)]),
        metric("beuss_start_time_seconds", "gauge", "When the server started.",
               [("", server["started"])]),
        metric("beuss_connected_clients", "gauge", "Client connections.",
               [("", server["connections"])]),
        metric("beuss_memory_used_bytes", "gauge", "Memory that messages take.",
               [("", server["memory_used_bytes"])]),
        metric("beuss_memory_max_bytes", "gauge", "--max-memory (0: no bound).",
               [("", server["memory_max_bytes"])]),
        metric("beuss_store_up", "gauge", "1 while the store can be written.",
               [("", int(server["store_ok"]))]),
        metric("beuss_store_commits_total", "counter", "Store commits.",
               [("", server["store_commits"])])])
    if server["last_commit"] is not None:
        yield metric("beuss_store_last_commit_timestamp_seconds", "gauge",
                     "When the store last committed.",
                     [("", server["last_commit"])])
    labels = []
    for at in range(0, len(snapshot.rows), 500):
        labels.extend('{queue="%s"}' % _metric_label(_name_text(row.name))
                      for row in snapshot.rows[at:at + 500])
        yield ""
    for field, name, kind, help in _QUEUE_METRICS:
        yield metric(name, kind, help, [])
        index = _QueueRow._fields.index(field)
        for at in range(0, len(labels), 500):
            yield "".join("%s%s %r\n" % (name, label, row[index]) for label, row
                          in zip(labels[at:at + 500], snapshot.rows[at:at + 500]))
    yield metric("beuss_queue_consumers", "gauge", "Consumers of the queue: "
                 "busy (holding a message of it) or waiting (blocked on it).",
                 [])
    for at in range(0, len(labels), 250):
        yield "".join('beuss_queue_consumers%s,state="%s"} %d\n' % (
            label[:-1], state, getattr(row, state)) for label, row
            in zip(labels[at:at + 250], snapshot.rows[at:at + 250])
            for state in ("busy", "waiting"))
    yield metric("beuss_channel_subscribers", "gauge",
                 "Subscribers of a channel.",
                 [('{channel="%s"}' % _metric_label(channel["name"]),
                   channel["subscribers"]) for channel in snapshot.channels])
    yield metric("beuss_published_total", "counter", "Messages published.",
                 [("", server["published"])])


def _asked_rows(snapshot, asked):
    """The rows a reader asked for: one queue (?queue=NAME), or all."""
    if "queue" not in asked:
        return snapshot.rows
    return [row for row in snapshot.rows
            if _name_text(row.name) == asked["queue"]]


def _json_pieces(snapshot, asked):
    """/status.json: JSON_PAGE queues a page, their history if asked."""
    import json
    rows = _asked_rows(snapshot, asked)
    pages = max((len(rows) + JSON_PAGE - 1) // JSON_PAGE, 1)
    page = int(asked.get("page", "1"))
    history = asked.get("history", "0") not in ("0", "", "false", "no")
    document = _status_document(snapshot, [], False)
    queues, clock = snapshot.server.queues, time.monotonic()
    document.update(queues_total=len(rows), page=page, pages=pages)
    text = json.dumps(document)
    cut = text.index('"queues": []') + len('"queues": [')
    yield text[:cut]
    for i, row in enumerate(rows[(page - 1) * JSON_PAGE:page * JSON_PAGE]):
        yield ("," if i else "") + json.dumps(_row_document(
            row, queues if history else None, clock))
    yield text[cut:]


def _chart(history, width=160, height=36):
    """An SVG of a queue's depth (filled) and its in and out rates (lines)
    over the last HISTORY seconds: history is [[seconds ago, depth, in,
    out], ...], oldest first. Its peaks are written on it, and every chart
    shares the time axis written under it (-15 min, -5 min, now)."""
    axis = ('<text x="0" y="%d">-15 min</text><text x="%.0f" y="%d" '
            'text-anchor="middle">-5 min</text><text x="%d" y="%d" '
            'text-anchor="end">now</text>' % (
                height + 10, width * 2 / 3, height + 10, width, height + 10))
    frame = ('<svg class="chart" width="%d" height="%d" viewBox="0 0 %d %d" '
             'role="img">' % (width, height + 12, width, height + 12))
    if len(history) < 2:
        return frame + axis + "</svg>"
    top = max(max(sample[1] for sample in history), 1)
    fast = max(max(max(sample[2], sample[3]) for sample in history), 0.001)

    def x(sample):
        return width - min(sample[0], HISTORY) / HISTORY * width

    def points(index, scale):
        return " ".join("%.1f,%.1f" % (x(sample), height - 1 - sample[index]
                                       / scale * (height - 4))
                        for sample in history)
    return (frame + '<title>depth up to %d, rates up to %.1f/s</title>'
            '<polygon points="%.1f,%d %s %.1f,%d" fill="#cfe3f7"/>'
            '<polyline points="%s" fill="none" stroke="#2a7d2a"/>'
            '<polyline points="%s" fill="none" stroke="#b35900"/>'
            '<text x="2" y="9">%s</text><text x="%d" y="9" '
            'text-anchor="end">%.1f/s</text>%s</svg>' % (
                top, fast, x(history[0]), height, points(1, top),
                x(history[-1]), height, points(2, fast), points(3, fast),
                "{:,}".format(top), width - 2, fast, axis))


def _actions(row, nonce):
    """A queue row's buttons: one form that POSTs to /action."""
    from urllib.parse import quote_from_bytes
    buttons = [("resume" if row.paused else "pause"), "empty"] + (
        ["redrive", "empty-dead"] if row.dead else [])
    return ('<td class="act"><form method="post" action="/action">'
            '<input type="hidden" name="queue" value="%s"><input type="hidden"'
            ' name="nonce" value="%s">%s</form></td>' % (
                quote_from_bytes(row.name, safe=""), nonce, " ".join(
                    '<button name="action" value="%s">%s</button>' % (
                        action, action.replace("-", " "))
                    for action in buttons)))


def _page_pieces(snapshot, asked):
    """The page: the server, then a row and a chart for each queue shown."""
    from html import escape
    server = snapshot.head
    size = _size_text
    memory = size(server["memory_used_bytes"]) + (
        " of " + size(server["memory_max_bytes"])
        if server["memory_max_bytes"] else "")
    store = ("%s, fsync %s, last commit %s" % (
        escape(server["store"]), server["fsync"], time.strftime(
            "%H:%M:%S", time.localtime(server["last_commit"]))
        if server["last_commit"] else "none yet") if server["store"]
        else "memory only")
    if server["store"] and not server["store_ok"]:
        store += ' <b class="bad">cannot write</b>'
    rows = _asked_rows(snapshot, asked)
    shown = rows[:PAGE_QUEUES]
    if "queue" in asked:
        left_out = ("one queue of %d; <a href=\"/\">all queues</a>"
                    % len(snapshot.rows))
    elif len(rows) > len(shown):
        left_out = ("the %d queues with the most backlog, dead letters and "
                    "age, of %d; ?queue=NAME shows one" % (len(shown), len(rows)))
    else:
        left_out = "sorted by backlog, dead letters and age"
    yield """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="5">
<title>beuss on %(host)s</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .3em; }
.server { color: #555; margin-bottom: 1em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { padding: .3em .6em; text-align: right; border-bottom: 1px solid #ddd;
         white-space: nowrap; vertical-align: middle; }
th:first-child, td:first-child { text-align: left; }
th { font-weight: 600; background: #f4f4f4; }
.bad { color: #fff; background: #c0392b; font-weight: 600; }
.key { color: #555; font-size: .9em; }
.key i { display: inline-block; width: 1.5em; height: .3em; margin: 0 .3em .2em; }
.chart text { font-size: 9px; fill: #555; }
.paused { color: #fff; background: #7f8c8d; font-size: .8em; padding: 0 .3em; }
.act form { margin: 0; }
.who { color: #555; font-size: .75em; white-space: normal; max-width: 16em; }
.act button { font-size: .8em; }
.done { background: #e8f5e9; border-left: 4px solid #2a7d2a; padding: .4em .8em; }
</style></head><body>
<h1>beuss %(version)s on %(host)s</h1>%(done)s
<div class="server">Python %(python)s (%(implementation)s), up %(uptime)s;
memory %(memory)s; %(connections)d connections of %(max_connections)d;
%(store)s; TLS %(tls)s, token %(token)s.</div>
<div class="scroll"><table id="queues">
<tr><th>queue</th><th>ready</th><th>held</th><th>deferred</th><th>dead</th>
<th title="busy: holding a message; waiting: blocked for one">consumers</th>
<th>in/s</th><th>out/s</th><th>oldest</th><th>last 15 min</th><th></th></tr>
""" % dict(host=escape("%s:%s" % (server["host"], server["port"])),
           version=escape(server["version"]), python=server["python"],
           implementation=server["implementation"],
           uptime=_age_text(server["uptime_seconds"]), memory=memory,
           connections=server["connections"],
           max_connections=server["max_connections"], store=store,
           tls="on" if server["tls"] else "off",
           token="on" if server["token"] else "off", done=(
               '\n<p class="done">%s</p>' % escape(snapshot.server.outcomes[
                   int(asked["done"])]) if asked.get("done", "").isdigit()
               and int(asked["done"]) in snapshot.server.outcomes else ""))
    queues, clock = snapshot.server.queues, time.monotonic()
    for row in shown:
        yield ("<tr><td>%s</td><td>%d</td><td>%d</td><td>%d</td><td%s>%d</td>"
               "<td>%s</td><td>%.1f</td><td>%.1f</td><td>%s</td><td>%s</td>"
               "%s</tr>\n" % (
                   escape(_name_text(row.name)) + (
                       ' <b class="paused">paused</b>' if row.paused else "")
                   + ('<div class="who">%s</div>' % escape(row.settings)
                      if row.settings else ""),
                   row.ready, row.held,
                   row.deferred, ' class="bad"' if row.dead else "", row.dead,
                   '%d busy%s, %d waiting%s' % (
                       row.busy, " (%s)" % _age_text(row.oldest_hold_seconds)
                       if row.busy else "", row.waiting,
                       '<div class="who">%s</div>' % escape(", ".join(
                           "%s %s" % pair for pair in row.consumers))
                       if row.consumers else ""),
                   row.in_per_second, row.out_per_second,
                   _age_text(row.oldest_age_seconds),
                   _chart(_history(queues, row.name, clock)),
                   _actions(row, snapshot.nonce)))
    if not shown:
        yield '<tr><td colspan="11">no queues</td></tr>\n'
    channels = "".join(
        "<tr><td>%s</td><td>%d</td><td>%.1f</td></tr>" % (
            escape(channel["name"]), channel["subscribers"],
            channel["published_per_second"])
        for channel in snapshot.channels[:PAGE_QUEUES])
    yield """</table></div>
<p class="key"><i style="background:#cfe3f7"></i>depth, its peak at the
left <i style="background:#2a7d2a"></i>in <i style="background:#b35900"></i>out,
their peak at the right; rates over the last minute; dead letters in their
queue's row; %s.</p>
<div class="scroll"><table id="channels">
<tr><th>channel</th><th>subscribers</th><th>published/s</th></tr>
%s
</table></div>
</body></html>
""" % (left_out, channels or '<tr><td colspan="3">no subscribers</td></tr>')


# ## Links: a server, a cluster's slots, and Lua in place of RESERVE #######
#
# A Redis Cluster splits its keys over 16384 slots (CRC16 of the key, or of
# its {hash tag}), each served by one primary. A node asked for a key it
# does not serve answers MOVED (the slot lives elsewhere now: the client
# reloads the map with CLUSTER SLOTS) or ASK (it is moving: that one
# command goes to the other node after ASKING). Commands without a key go
# to the node the client was pointed at; LIST and STATS ask every primary.
#
# Redis has no RESERVE: the client picks an engine once, the first time it
# needs one, by asking the server. _Beuss sends beuss's own commands as they
# are; _Scripts runs, in their place, the Lua declared beside each of them
# in "Commands: beuss's own"; _Pops, for a Redis without Lua, takes
# messages with plain pops and says once that a failed one is lost.

MAX_REDIRECTS = 10              # MOVED, ASK or TRYAGAIN followed a command
_REDIRECTIONS = ("MOVED ", "ASK ", "TRYAGAIN ")
SCRIPT_POLL_FIRST, SCRIPT_POLL_MAX = 0.005, 0.1
REDRIVE_BATCH = 1000            # dead letters a redrive script moves

class _Link:
    """One connection of a Client: to its server, or to one node of a
    cluster; opened on first use, with the client's token and TLS.

    Threads that share a Client take turns on each connection: an
    exchange (requests, then all their replies) is one thread's whole. A
    blocking wait keeps the connection for its length, so a consumer
    thread is best given a Client of its own."""

    def __init__(self, client, host, port):
        import _thread              # (threading would cost a one-shot command)
        self.client, self.host, self.port = client, host, port
        self.sock = self.reader = None
        self.lock = _thread.RLock()     # talk's, which connect calls again

    def close(self):
        if self.sock is not None:
            self.sock.close()
            self.sock = self.reader = None

    def connect(self):
        client = self.client
        try:
            sock = socket.create_connection((_host_bytes(self.host),
                                             self.port), client.timeout)
        except OSError as exc:
            raise ConnectionFailed("cannot reach the server at %s:%d: %s"
                                   % (self.host, self.port, _reason(exc)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if client.tls:
            import ssl
            try:
                # The server's certificate is checked, against --tls-ca or
                # the system's authorities, and must name the host.
                context = ssl.create_default_context(cafile=client.tls_ca)
                sock = context.wrap_socket(sock, server_hostname=self.host)
            except (OSError, ValueError) as exc:
                sock.close()
                raise ConnectionFailed("no TLS with the server at %s:%d: %s"
                                       % (self.host, self.port, _reason(exc)))
        self.sock, self.reader = sock, ReplyReader(sock)
        if client.token is not None:
            reply = self.talk([[b"AUTH", _arg(client.token)]], 1)[0]
            if isinstance(reply, ReplyError):
                self.close()
                raise reply
        if client.name is not None:
            # What CLIENT LIST and the status page call this consumer.
            self.talk([[b"CLIENT", b"SETNAME", client.name]], 1)

    def talk(self, commands, replies, wait=0.0):
        """Send commands (lists of bytes), then read that many replies."""
        with self.lock:
            return self._talk(commands, replies, wait)

    def _talk(self, commands, replies, wait):
        fresh = self.sock is None
        if fresh:
            self.connect()
        request = b"".join(encode_bulks(command) for command in commands)
        try:
            self.sock.settimeout(self.client.timeout + wait)
            self.sock.sendall(request)
            return [self.reader.read() for _ in range(replies)]
        except OSError as exc:
            self.close()
            # A TLS server drops a plain client at its first request.
            hint = "; if it serves TLS, connect with --tls" if fresh and not \
                self.client.tls and not isinstance(exc, socket.timeout) else ""
            raise ConnectionFailed("lost the server at %s:%d: %s%s"
                                   % (self.host, self.port, _reason(exc), hint))
        except (ProtocolError, ValueError) as exc:
            self.close()
            if "'HTTP/" in str(exc):
                raise ProtocolError(
                    "the server at %s:%d answers in HTTP: that is a web "
                    "server's port (a beuss status page's?), not the bus's"
                    % (self.host, self.port))
            raise ProtocolError("the server at %s:%d does not answer in the "
                                "Redis protocol" % (self.host, self.port))
        except BaseException:
            # Interrupted half way: the replies still due would be read as
            # answers to the next command, so the connection is dropped.
            self.close()
            raise


class _Routing:
    """The part of Client that finds each command's node (mixed in)."""

    def _node(self, address):
        link = self._nodes.get(address)
        if link is None:            # (setdefault: threads may come together)
            link = self._nodes.setdefault(address, _Link(self, *address))
        return link

    def _node_of(self, command):
        """The link for a command: its keys' slot's primary, or home."""
        slots = {key_slot(key) for key in _command_keys(command)}
        if len(slots) > 1:
            raise ReplyError(
                "ERR %s names queues that the cluster keeps on different "
                "slots; to use them in one command give them one hash tag, "
                "as {app}jobs and {app}mail" % command[0].decode(
                    "utf-8", "replace"))
        if not slots or self._slots is None:
            return self._home
        address = self._slots[slots.pop()]
        return self._home if address is None else self._node(address)

    def _load_slots(self, link):
        """Learn which primary serves which slot; ReplyError if the server
        is not part of a cluster."""
        reply = link.talk([[b"CLUSTER", b"SLOTS"]], 1)[0]
        if isinstance(reply, ReplyError) or not reply:
            raise reply or ReplyError("ERR the cluster serves no slot")
        slots = [None] * CLUSTER_SLOTS
        for first, last, primary in (entry[:3] for entry in reply):
            host = primary[0].decode() or link.host
            slots[first:last + 1] = [(host, primary[1])] * (last + 1 - first)
        self._slots, self._cluster = slots, True

    def _primaries(self):
        """The links to every primary of a cluster, or to the one server."""
        if self._cluster is None:
            try:
                self._load_slots(self._home)
            except ReplyError:
                self._cluster = False
        if not self._cluster:
            return [self._home]
        return [self._node(address) for address in sorted(
            set(address for address in self._slots if address))]

    def _redirected(self, command, reply, wait):
        """Run command where a MOVED or an ASK reply sends it, or again
        after TRYAGAIN (its keys are half way to another node: a script
        on a queue whose slot is moving), a little later."""
        pause = 0.05
        for _ in range(MAX_REDIRECTS):
            kind, _, address = str(reply).split(" ", 2)
            if kind == "TRYAGAIN":
                time.sleep(pause)
                pause = min(pause * 2, 0.5)
                reply = self._node_of(command).talk([command], 1, wait)[0]
            elif kind == "MOVED":
                host, _, port = address.rpartition(":")
                node = self._node((host or self.host, int(port)))
                self._load_slots(node)
                reply = self._node_of(command).talk([command], 1, wait)[0]
            else:
                host, _, port = address.rpartition(":")
                reply = self._node((host or self.host, int(port))).talk(
                    [[b"ASKING"], command], 2, wait)[1]
            if not (isinstance(reply, ReplyError) and str(reply).startswith(
                    _REDIRECTIONS)):
                return reply
        return ReplyError("ERR the cluster sent %s elsewhere %d times: its "
                          "slots are moving; try again" % (
                              command[0].decode("utf-8", "replace"),
                              MAX_REDIRECTS))

    def _names(self, link, match=b"*"):
        """The names of the keys one node holds that match (SCAN)."""
        names, cursor = [], b"0"
        while True:
            cursor, batch = _raise(link.talk([[
                b"SCAN", cursor, b"MATCH", match, b"COUNT", b"1000"]], 1)[0])
            names += batch
            if cursor == b"0":
                return names

    def node_address(self, queue):
        """(host, port) of the server that keeps queue."""
        self._primaries()
        link = self._node_of([b"LLEN", _arg(queue)])
        return link.host, link.port


CLUSTER_SLOTS = 16384
_CRC16 = []                     # made on the first key_slot()


def _crc16_table():
    # CRC-16/XMODEM (polynomial 0x1021, start 0), as a cluster hashes keys.
    # Made whole, then put in place in one step: threads that find it
    # missing together each make one, and none sees a part.
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = (crc << 1 ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
        table.append(crc)
    _CRC16[:] = table


def _hash_tag(key):
    """The part of key a cluster hashes: what its first {...} holds, when
    that is not empty; else the whole key."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1:end]
    return key


def key_slot(key):
    """The slot of a Redis Cluster that keeps key (bytes or str)."""
    if not _CRC16:
        _crc16_table()
    crc = 0
    for byte in bytearray(_hash_tag(_arg(key))):
        crc = (crc << 8 & 0xFF00) ^ _CRC16[crc >> 8 ^ byte]
    return crc % CLUSTER_SLOTS


# Commands the client may send that beuss lacks, by their keys' positions
# as the command table gives them (first, last, step; 0: none).
_OTHER_KEYS = {b"unlink": [1, -1, 1], b"mget": [1, -1, 1],
               b"time": [0, 0, 0], b"cluster": [0, 0, 0],
               b"script": [0, 0, 0], b"asking": [0, 0, 0]}


def _command_keys(command):
    """The keys a command names, as the command table's key column places
    them (EVAL's by its count); a command beuss does not know, its first
    argument."""
    name = command[0].lower()
    if name in (b"eval", b"evalsha"):
        return command[3:3 + int(command[2])]
    row = COMMANDS.get(name)
    first, last, step = row.keys if row is not None else _OTHER_KEYS.get(
        name, [1, 1, 1])
    if name == b"reserve" and len(command) >= 5 and \
            command[-2].upper() == b"COUNT":
        last = -4                           # RESERVE ... timeout COUNT n
    return command[first:len(command) + last + 1 if last < 0 else last + 1:
                   step] if first else []




def _script_keys(queue):
    queue = _arg(queue)
    prefix = queue if _hash_tag(queue) != queue else b"{" + queue + b"}"
    return [queue] + [prefix + b":" + part for part in COMPANIONS]


def _companion(queue, part):
    """One of a queue's companion keys (part: one of COMPANIONS)."""
    return _script_keys(queue)[1 + COMPANIONS.index(part)]


def _seen_key(queue, key):
    """The key that remembers an id of PUT ... ID, in the queue's slot:
    "{jobs}:seen:<id>", until its window ends."""
    return _companion(queue, b"held")[:-len(b"held")] + b"seen:" + _arg(key)


def _queue_of_prefix(prefix):
    """The queue whose companions start with prefix ("{jobs}"), or None."""
    inner = prefix[1:-1]
    if prefix[:1] == b"{" and prefix[-1:] == b"}" and _hash_tag(inner) == inner:
        return inner
    return prefix if _hash_tag(prefix) != prefix else None


def _companion_of(name):
    """(queue, part) when name is a companion key, else (name, None); an
    id's key of PUT ... ID is (queue, b"seen")."""
    prefix, seen, _ = name.partition(b":seen:")
    if seen and _queue_of_prefix(prefix) is not None:
        return _queue_of_prefix(prefix), b"seen"
    prefix, colon, part = name.rpartition(b":")
    if colon and part in COMPANIONS and _queue_of_prefix(prefix) is not None:
        return _queue_of_prefix(prefix), part
    return name, None




_SCRIPTS = {}                   # name -> (its text, its SHA1 for EVALSHA)


def script_source(name):
    """(text, SHA1) of one of the scripts, made on first use: importing
    hashlib would cost every one-shot command 6 ms."""
    if name not in _SCRIPTS:
        import hashlib
        names = ["queue"] + [part.decode() for part in COMPANIONS]
        keys = "local %s = %s\n" % (", ".join(names), ", ".join(
            "KEYS[%d]" % number for number in range(1, len(names) + 1)))
        defaults = "local DEFAULTS = {%s}\n" % ", ".join(
            "['%s'] = '%s'" % (setting, _queue_value(default))
            for setting, (default, _) in QUEUE_SETTINGS.items())
        text = (keys + defaults + _LUA_START + _LUA[name]).encode()
        _SCRIPTS[name] = text, hashlib.sha1(text).hexdigest().encode()
    return _SCRIPTS[name]


class _Beuss:
    """The engine for a beuss server: its own commands, sent as they are.
    Every engine has these methods; the Client calls nothing else of it."""

    def __init__(self, client):
        self.client = client

    def own(self, command, *args, wait=0.0):
        return self.client.call(command, *args, wait=wait)

    def put(self, queue, batches, key=None, ttl=None):
        # RPUSH each batch, in one round trip; the last length. With key
        # or ttl (one message), PUT ... ID ... TTL.
        if key is not None or ttl is not None:
            return self.own(b"PUT", queue, batches[0][0], *(
                ([b"ID", key] if key is not None else []) +
                ([b"TTL", _number_text(ttl)] if ttl is not None else [])))
        return [_raise(reply) for reply in self.client.pipeline([
            [b"RPUSH", queue] + batch for batch in batches])][-1]

    def queue(self, subcommand, queue, words=()):
        """QUEUE SET, GET or RESET; GET's pairs as a dict of text."""
        reply = self.own(b"QUEUE", subcommand, queue, *words)
        return dict(zip(reply[::2], reply[1::2])) if subcommand == b"GET" \
            else reply

    def reserve(self, queue, deadline, count):
        # Up to count messages (None: one, with RESERVE's plain form), in
        # at most a slice (deadline None: not waiting); a list.
        seconds = 0.001 if deadline is None else min(
            BLOCK_SLICE, max(deadline - time.monotonic(), 0.001))
        reply = self.own(b"RESERVE", queue, "%.3f" % seconds, *(
            [b"COUNT", count] if count else []), wait=seconds)
        return [] if reply is None else [
            Message(self.client, one[0], one[1], one[2], one[3])
            for one in (reply if count else [reply])]

    def ack(self, ids):
        return self.own(b"ACK", *ids)

    def nack(self, ids, delay, reason, undelivered):
        options = [b"UNDELIVERED"] if undelivered else []
        if delay is not None:
            options += [b"DELAY", delay]
        if reason is not None:
            options += [b"REASON", reason]
        return self.own(b"NACK", *(list(ids) + options))

    def touch(self, ids):
        return self.own(b"TOUCH", *ids)

    def defer(self, queue, delay, messages):
        return self.own(b"DEFER", queue, delay, *messages)

    def redrive(self, queue, count):
        return self.own(b"REDRIVE", queue, *([] if count is None else [
            count]))

    def why(self, queue, start, stop):
        return self.own(b"WHY", queue, start, stop)

    def pause(self, queues, paused):
        return self.own(b"PAUSE" if paused else b"RESUME", *queues)

    def configured(self):
        return _configured(_queue_lines(self.client.info()))

    def paused_queues(self):
        return [name for name, line in _queue_lines(
            self.client.info()).items() if line.get("paused") == "1"]

    def delete(self, queues):
        return sum(map(_raise, self.client.pipeline([(b"DEL", queue)
                                                     for queue in queues])))

    def put_dead(self, queue, records):
        # RPUSH carries no record: they become plain messages of .dead.
        return self.client.call(b"RPUSH", _arg(queue) + b".dead", *[
            record.message for record in records])


class _Pops(_Beuss):
    """The engine for a Redis without Lua: plain pops, nothing held."""

    def own(self, command, *args, wait=0.0):
        raise ReplyError("the server at %s:%d offers neither %s nor Lua "
                         "scripts to stand in for it" % (
                             self.client.host, self.client.port,
                             command.decode()))

    warned = False

    def reserve(self, queue, deadline, count):
        client = self.client
        if not self.warned:
            self.warned = True
            _warn("the server at %s:%d runs neither RESERVE nor Lua scripts: "
                  "messages are taken with plain pops, and one is lost if "
                  "its handler dies" % (client.host, client.port))
        data = client.get(queue) if deadline is None else \
            client._wait_one(queue, deadline)
        found = [] if data is None else [data]
        if found and count and count > 1:
            found += client.call(b"LPOP", queue, count - 1) or []
        return [Message(client, queue, None, data) for data in found]

    def paused_queues(self):
        return []


class _Scripts:
    """The engine for a Redis, a Valkey or a Redis Cluster: the Lua of
    each own command (_LUA), on the queue's keys. Its ids name their queue
    and their delivery: "<id>/<delivery>@<queue>"."""

    def __init__(self, client):
        self.client = client

    def script(self, name, queue, *args, more_keys=()):
        text, sha = script_source(name)
        keys = _script_keys(queue) + list(more_keys)
        tail = [len(keys)] + keys + list(args)
        reply = self.client.pipeline([[b"EVALSHA", sha] + tail])[0]
        if isinstance(reply, ReplyError) and str(reply).startswith(
                "NOSCRIPT"):
            reply = self.client.pipeline([[b"EVAL", text] + tail])[0]
        return _raise(reply)

    def retry_arguments(self):
        client = self.client
        return [client.max_deliveries, _number_text(client.retry_delay),
                _number_text(client.retry_max_delay)]

    def by_queue(self, name, ids, *args):
        """Run script name on the ids of each queue; the sum of replies."""
        by_queue = {}
        for message_id in ids:
            number, _, queue = _arg(message_id).partition(b"@")
            by_queue.setdefault(queue, []).append(number)
        return sum(self.script(name, queue, *(list(args) + numbers))
                   for queue, numbers in by_queue.items())

    def put(self, queue, batches, key=None, ttl=None):
        ttl = b"" if ttl is None else _duration_text(ttl)
        if key is None:
            return [self.script("put", queue, b"", ttl, *batch)
                    for batch in batches][-1]
        return self.script("put", queue, key, ttl, *batches[0],
                           more_keys=[_seen_key(queue, key)])

    def queue(self, subcommand, queue, words=()):
        key = _companion(queue, b"settings")
        if subcommand == b"GET":
            found = _raise(self.client.pipeline([[b"HGETALL", key]])[0])
            return dict(zip(found[::2], found[1::2]))
        if subcommand == b"RESET":
            self.client.call(b"DEL", key)
            return "OK"
        if _arg(queue).endswith(b".dead"):
            raise ReplyError("ERR %s holds dead letters, which take no "
                             "settings" % _name_text(_arg(queue)))
        settings = _queue_settings(words)       # the server's checks
        given = {_arg(name).decode("utf-8", "replace").lower()
                 for name in words[::2]}
        at_default = [name for name in given if name not in settings]
        if at_default:
            self.client.call(b"HDEL", key, *at_default)
        if settings:
            self.client.call(b"HSET", key, *[part for name, value in
                                             settings.items() for part in (
                                                 name, _queue_value(value))])
        if "dedup-window" in given:             # shorten the ids known
            self.shorten_seen(queue, settings.get("dedup-window", QUEUE_SETTINGS[
                "dedup-window"][0]))
        return "OK"

    def shorten_seen(self, queue, window):
        link, prefix = self.client._node_of([b"LLEN", queue]), _seen_key(
            queue, b"")
        pattern = b"".join(b"\\" + bytes([c]) if c in b"*?[]\\" else
                           bytes([c]) for c in prefix) + b"*"
        keys = self.client._names(link, pattern)
        longest = max(int(window * 1000), 1)
        for key, left in zip(keys, link.talk([[b"PTTL", key] for key in keys],
                                             len(keys))):
            if isinstance(left, int) and left > longest:
                link.talk([[b"PEXPIRE", key, b"%d" % longest]], 1)

    def reserve(self, queue, deadline, count):
        # deadline None: one try; else tries for at most a slice.
        pause, end = SCRIPT_POLL_FIRST, None if deadline is None else min(
            deadline, time.monotonic() + BLOCK_SLICE)
        while True:
            reply = self.script("reserve", queue, _number_text(
                self.client.lease), *self.retry_arguments() + [count or 1])
            if reply is not None:
                return [Message(self.client, queue, b"%s/%d@%s" % (
                    reply[at], reply[at + 2], _arg(queue)), reply[at + 1],
                    reply[at + 2]) for at in range(0, len(reply), 3)]
            left = 0 if end is None else end - time.monotonic()
            if left <= 0:
                return []
            time.sleep(min(pause, left))
            pause = min(pause * 2, SCRIPT_POLL_MAX)

    def ack(self, ids):
        return self.by_queue("ack", ids)

    def nack(self, ids, delay, reason, undelivered):
        return self.by_queue("nack", ids, -1 if delay is None else delay,
                             reason or b"", *self.retry_arguments() + [
                                 1 if undelivered else 0])

    def touch(self, ids):
        return self.by_queue("touch", ids, _number_text(self.client.lease))

    def defer(self, queue, delay, messages):
        return self.script("defer", queue, delay, *messages)

    def redrive(self, queue, count):
        moved = 0
        while count is None or moved < count:
            batch = REDRIVE_BATCH if count is None else min(
                REDRIVE_BATCH, count - moved)
            done = self.script("redrive", queue, batch)
            moved += done
            if done < batch:
                break
        return moved

    def why(self, queue, start, stop):
        queue = _arg(queue)
        if not queue.endswith(b".dead"):
            return [(message, None, None, None) for message in
                    self.client.call(b"LRANGE", queue, start, stop)]
        messages, records = self.client.pipeline([
            [b"LRANGE", _companion(queue[:-len(b".dead")], part), start, stop]
            for part in (b"dead", b"why")])
        parsed = []                     # [deliveries, died, why] each
        for record in records[:len(messages)]:
            tries, died, why = record.split(b" ", 2)
            parsed.append([int(tries), died, why])
        return [[message] + record for message, record in
                itertools.zip_longest(messages, parsed, fillvalue=[None] * 3)]

    def pause(self, queues, paused):
        return sum(reply in ("OK", 1) for reply in self.client.pipeline([
            [b"SET", _companion(queue, b"paused"), b"1", b"NX"] if paused
            else [b"DEL", _companion(queue, b"paused")] for queue in queues]))

    def configured(self):
        found = {}
        for link in self.client._primaries():
            keys = [key for key in self.client._names(link, b"*:settings")
                    if _companion_of(key)[1] == b"settings"]
            for key, pairs in zip(keys, link.talk([[b"HGETALL", key]
                                                   for key in keys], len(keys))):
                found[_companion_of(key)[0].decode(
                    "utf-8", "surrogateescape")] = _queue_settings_text({
                        name.decode(): value.decode() for name, value in
                        zip(pairs[::2], pairs[1::2])})
        return found

    def paused_queues(self):
        return [queue.decode("utf-8", "surrogateescape")
                for link in self.client._primaries() for queue, part in map(
                    _companion_of, self.client._names(link, b"*:paused"))
                if part == b"paused"]

    def delete(self, queues):
        deleted = 0
        for queue in map(_arg, queues):
            if queue.endswith(b".dead"):        # the dead letters and why
                deleted += self.client.call(b"DEL", *[_companion(
                    queue[:-len(b".dead")], part) for part in (
                        b"dead", b"why")]) > 0
            else:
                deleted += self.script("del", queue)
        return deleted

    def put_dead(self, queue, records):
        # Into the companion lists, with their records, as if they died here.
        why = [b"%d %.3f %s" % (record.deliveries or 0, record.died or 0.0, (
            record.why or "(put there by hand)").encode("utf-8"))
            for record in records]
        return self.script("put_dead", queue, *([
            record.message for record in records] + why))


def _choose_engine(client):
    """The engine for the server client talks to, asked once: a beuss
    knows RESERVE; a Redis runs Lua, or not."""
    known = client.pipeline([[b"COMMAND", b"INFO", b"RESERVE"]])[0]
    if isinstance(known, list) and known[:1] != [None]:
        return _Beuss(client)
    if not isinstance(client.pipeline([[b"EVAL", b"return 1", b"0"]])[0],
                      ReplyError):
        return _Scripts(client)
    return _Pops(client)


# ## Client ###################################################################

DEFAULT_TIMEOUT = 10.0          # seconds to connect, or to wait for a reply
BLOCK_SLICE = 1.0               # a long wait is cut in slices so Ctrl-C works
RECONNECT_FIRST, RECONNECT_MAX = 0.1, 5.0
PUT_MANY_BATCH = 1000           # messages a RPUSH in put_many


class Client(_Routing):
    """A connection to a beuss server, a Redis (or Valkey), or a Redis
    Cluster, opened on first use. Threads may share it (each exchange is
    whole, see _Link), but a blocking wait and listen() keep its
    connection meanwhile, and subscribe() takes it for good: a consumer
    thread is best given its own.

    Against a cluster it keeps the map of which primary serves which slot,
    learnt from the first MOVED, and sends each queue's commands to its
    node (see "Links" above). Against a server without RESERVE
    it gives the same at-least-once semantics with Lua scripts.

    Settings not given come from BHOST, BPORT, ..., then the defaults; the
    lease and retry settings matter only where scripts stand in for the
    server (BLEASE, BMAXDELIVERIES, BRETRYDELAY, BRETRYMAXDELAY). Error
    replies raise ReplyError; a server that cannot be reached, or a
    connection that breaks, raises ConnectionFailed. Messages come back as
    bytes.
    """

    def __init__(self, host=None, port=None, timeout=DEFAULT_TIMEOUT,
                 token=None, tls=None, tls_ca=None, lease=None,
                 max_deliveries=None, retry_delay=None, retry_max_delay=None):
        self.host = _setting_of("host", host)
        self.port = _setting_of("port", port)
        self.token = _setting_of("token", token)
        self.tls_ca = _setting(tls_ca, "--tls-ca", "BTLSCA", None)
        self.tls = _setting(tls, "--tls", "BTLS", False, _yes) or bool(
            self.tls_ca)
        self.timeout = timeout
        # The server's settings, which are the consumer's where scripts
        # stand in for the server (on a Redis: a lease of a minute).
        self.lease = _setting_of("lease", lease, DEFAULT_SCRIPT_LEASE)
        self.max_deliveries = _setting_of("max_deliveries", max_deliveries)
        self.retry_delay = _setting_of("retry_delay", retry_delay)
        self.retry_max_delay = _setting_of("retry_max_delay", retry_max_delay)
        self._engine = None         # _choose_engine's, on first use
        self.name = None            # CLIENT SETNAME's, given by call_me()
        self._home = _Link(self, self.host, self.port)
        self._nodes = {(self.host, self.port): self._home}
        self._slots = None          # a cluster's slot -> its primary's address
        self._cluster = None        # whether it is a cluster; None: not asked

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return "<beuss.Client %s:%d>" % (self.host, self.port)

    def close(self):
        for link in self._nodes.values():
            link.close()

    def pipeline(self, commands, wait=0.0):
        """Send every command at once, then read all their replies: one
        round trip (one a node, on a cluster). An error reply comes back as
        a ReplyError instance."""
        commands = [[_arg(arg) for arg in command] for command in commands]
        for command in commands:
            # A server closes the connection on a bulk over 512 MiB (Redis
            # too): refuse it here, in words.
            if any(len(arg) > MAX_BULK_LENGTH for arg in command):
                raise ReplyError("ERR message too large (at most %d bytes "
                                 "an argument)" % MAX_BULK_LENGTH)
        if self._slots is None:
            replies = self._home.talk(commands, len(commands), wait)
        else:
            replies, by_node = [None] * len(commands), {}
            for i, command in enumerate(commands):
                by_node.setdefault(self._node_of(command), []).append(i)
            for link, indexes in by_node.items():
                for i, reply in zip(indexes, link.talk(
                        [commands[i] for i in indexes], len(indexes), wait)):
                    replies[i] = reply
        for i, reply in enumerate(replies):
            if isinstance(reply, ReplyError) and str(reply).startswith(
                    _REDIRECTIONS):
                replies[i] = self._redirected(commands[i], reply, wait)
        return replies

    def _talk(self, commands, replies, wait=0.0):
        """Send commands to the server named, then read that many replies
        (subscriptions, which read their messages as they come)."""
        return self._home.talk([[_arg(arg) for arg in command]
                                for command in commands], replies, wait)

    def call(self, *args, wait=0.0):
        """Run one command; return its reply or raise its error."""
        reply = self.pipeline([args], wait)[0]
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    # Queues ----------------------------------------------------------------

    def put(self, queue, message, delay=None, id=None, ttl=None):
        """Append message to queue; return the queue's new length. With
        delay (seconds), the message joins the tail once the delay has
        passed (DEFER); then the reply is how many of queue's messages wait
        so. With id, only if no message was put with that id on queue
        within its dedup-window (5 minutes): 0 then, nothing added. With
        ttl (seconds), it goes to the dead letters if no consumer took it
        within ttl."""
        if delay and (id is not None or ttl is not None):
            raise ValueError("put() takes a delay, or an id and a ttl")
        if delay:
            return self._defer(queue, delay, [_arg(message)])
        if ttl is not None:
            ttl = float(_duration(ttl))
            if not ttl:
                raise ReplyError("ERR TTL must be more than 0 seconds")
        return self.engine.put(queue, [[_arg(message)]], id, ttl)

    @property
    def engine(self):
        """What runs beuss's own commands here: _Beuss, _Scripts or _Pops
        (see Links), chosen once, on first use."""
        if self._engine is None:
            self._engine = _choose_engine(self)
        return self._engine

    def serves_reserve(self):
        """Whether the server is a beuss (RESERVE is its own), not a Redis
        on which scripts stand in; asked once, without taking anything."""
        return type(self.engine) is _Beuss

    def _defer(self, queue, delay, messages):
        delay = _number_text(delay)
        _delay(delay)               # the server's words for a bad one
        return self.engine.defer(queue, delay, messages)

    def redrive(self, queue, count=None):
        """Move the dead letters of queue (all, or count) back to its tail
        as new messages; return how many moved."""
        return self.engine.redrive(queue, count)

    def why(self, queue, start=0, stop=-1):
        """The messages of a dead-letter queue ("jobs.dead") with why they
        died, from start to stop as LRANGE counts them: a DeadRecord
        (.message, .deliveries, .died, .why) each; .why is None for a
        message put there by hand."""
        return [DeadRecord(*record) for record in self.engine.why(
            queue, start, stop)]

    def put_dead(self, queue, records):
        """Add dead letters (DeadRecords, as why() gives them) to the tail
        of queue's: on Redis or a cluster with their records, into the
        queue's companion lists, as if they had died there; on a beuss as
        plain messages of "<queue>.dead" (RPUSH carries no record). For a
        move from one to the other; returns how many there are now."""
        return self.engine.put_dead(queue, records) if records else 0

    def configure(self, queue, reset=False, **settings):
        """QUEUE SET queue's settings, named with _ for - (max_length=100,
        overflow="drop-oldest"); with reset, QUEUE RESET first (every
        setting back to its default). Returns them all, as settings()."""
        if reset:
            self.engine.queue(b"RESET", queue)
        if settings:
            self.engine.queue(b"SET", queue, [part for name, value in sorted(
                settings.items()) for part in (name.replace("_", "-"),
                                               value)])
        return self.settings(queue)

    def settings(self, queue):
        """QUEUE GET: {setting: value} of queue, every setting there."""
        found = self.engine.queue(b"GET", queue)
        return {name: parse(found[name.encode()].decode())
                if name.encode() in found else default
                for name, (default, parse) in QUEUE_SETTINGS.items()}

    def call_me(self, role, detail=None):
        """Name the connections to the server, as CLIENT LIST and the
        status page show them: role (ON, GET, on), this host and process,
        and detail (ON's command) after a colon, e.g. ON@pi:1234:handle.
        Only the characters Redis allows in a name are kept."""
        text = "%s@%s:%d" % (role, socket.gethostname(), os.getpid()) + (
            ":" + detail if detail else "")
        self.name = "".join(c if "!" <= c <= "~" else "_"
                            for c in text)[:100].encode("ascii", "replace")
        for link in self._nodes.values():
            if link.sock is not None:
                link.talk([[b"CLIENT", b"SETNAME", self.name]], 1)

    def pause(self, *queues, paused=True):
        """PAUSE (RESUME: paused False) queues: they take messages and
        deliver none until resumed; how many changed. On Redis the flag
        is a companion key the scripts respect (plain pops do not)."""
        return self.engine.pause(queues, paused)

    def paused_queues(self):
        """The names of the paused queues (over every primary)."""
        return sorted(self.engine.paused_queues())

    def put_many(self, queue, messages, delay=None):
        """Append many messages in one round trip; return the final length
        (with delay, see put())."""
        messages = [_arg(message) for message in messages]
        if delay:
            reply = 0
            for i in range(0, len(messages), PUT_MANY_BATCH):
                reply = self._defer(queue, delay,
                                    messages[i:i + PUT_MANY_BATCH])
            return reply
        if not messages:
            return self.len(queue)
        return self.engine.put(queue, [messages[i:i + PUT_MANY_BATCH] for i
                                       in range(0, len(messages),
                                                PUT_MANY_BATCH)])

    def get(self, queue, wait=None):
        """Take the head message of queue, or None when it is empty. With
        wait, wait that many seconds for one (0: for ever)."""
        if wait is None:
            return self.call(b"LPOP", queue)
        deadline = time.monotonic() + wait if wait else FOREVER
        while True:
            message = self._wait_one(queue, deadline)
            if message is not None or time.monotonic() >= deadline:
                return message

    def _wait_one(self, queue, deadline):
        # BLPOP for at most a slice, so that Ctrl-C gets through everywhere.
        seconds = min(BLOCK_SLICE, max(deadline - time.monotonic(), 0.001))
        reply = self.call(b"BLPOP", queue, "%.3f" % seconds, wait=seconds)
        return None if reply is None else reply[1]

    def listen(self, queue, idle=None, reconnect=True):
        """Yield the messages of queue as they come, for ever, or until no
        message came for `idle` seconds. If the server goes away, wait for
        it to come back (saying so on stderr) unless reconnect is False.
        In the main thread the first SIGTERM or Ctrl-C ends it cleanly: at
        once while it waits, else once the caller asks for the next
        message; a second raises Stopped (a SystemExit)."""
        with _Stopper() as stopper:
            try:
                for message in self._keep_waiting(
                        lambda deadline: self._wait_one(queue, deadline),
                        idle, reconnect):
                    stopper.busy = True
                    yield message
                    stopper.busy = False
                    if stopper.asked:
                        return
            except Stopped as exc:
                if exc.status:
                    raise

    def _keep_waiting(self, wait_one, idle, reconnect, slices=False):
        # Yield what wait_one(deadline) returns (None: nothing within a
        # slice), through server restarts, until idle seconds pass empty.
        delay = None                    # seconds to the next retry, once lost
        last = time.monotonic()
        while True:
            deadline = last + idle if idle is not None else FOREVER
            try:
                message = wait_one(deadline)
            except ConnectionFailed as exc:
                if not reconnect:
                    raise
                if delay is None:
                    _warn("%s; trying again until it is back" % exc)
                    delay = RECONNECT_FIRST
                if time.monotonic() + delay >= deadline:
                    # Idle for as long as allowed, the server away: that is
                    # its failure, not an empty queue.
                    raise ConnectionFailed("%s; gave up waiting" % exc)
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            if delay is not None:
                _warn("back on the server at %s:%d" % (self.host, self.port))
                delay = None
            if message is not None:
                yield message
                last = time.monotonic()
            elif time.monotonic() >= deadline:
                return
            elif slices:
                yield None

    def on(self, queue, handler, count=None, idle=None, reconnect=True,
           batch=None):
        """Call handler(message) for each message of queue, for ever, or for
        count messages, or until none came for `idle` seconds. A message is
        acknowledged once handler returns; if handler raises, the message
        goes back to the head of the queue and the exception goes on up.
        With batch, handler gets a list of up to batch messages, taken and
        acknowledged together (count then counts batches).
        In the main thread, the first SIGTERM or Ctrl-C ends it cleanly: at
        once while it waits, else once the handler returned and its message
        is acknowledged; a second gives the message back and raises Stopped
        (a SystemExit of 143 or 130). Returns how many were handled."""
        handled = 0
        if count == 0:
            return handled
        if self.name is None:
            self.call_me("on")
        try:
            with _Stopper() as stopper:
                for messages in self._keep_waiting(
                        lambda deadline: self.engine.reserve(
                            queue, deadline, batch) or None,
                        idle, reconnect):
                    stopper.busy = True
                    try:
                        handler([message.data for message in messages]
                                if batch else messages[0].data)
                    except Stopped:
                        _give_back(messages, delay=0)
                        raise
                    except BaseException as exc:
                        _give_back(messages, reason=_failure(exc))
                        raise
                    _acknowledge(messages, reconnect)
                    stopper.busy = False
                    handled += 1
                    if count is not None and handled >= count \
                            or stopper.asked:
                        break
        except Stopped as exc:
            if exc.status:
                raise
        return handled

    # Reserving -----------------------------------------------------------

    def reserve(self, queue, wait=None, count=None):
        """Take the head message of queue and hold it until .ack(): a
        Message, or None when the queue is empty (with wait, wait that many
        seconds for one; 0: for ever). With count, up to count messages at
        once, in one round trip: a list of Messages, [] for none (ack()
        takes their ids at once). If this connection closes before the ack,
        the server puts the message back at the head of its queue. Against
        a Redis, Lua scripts hold it under a lease instead; where there is
        no Lua either, it is a plain pop, said once on stderr."""
        deadline = None if wait is None else (
            time.monotonic() + wait if wait else FOREVER)
        while True:
            messages = self.engine.reserve(queue, deadline, count)
            if messages or deadline is None or time.monotonic() >= deadline:
                if count is None:
                    return messages[0] if messages else None
                return messages

    def reservations(self, queue, idle=None, reconnect=True, slices=False,
                     batch=None):
        """Yield a reserved Message of queue as each comes, as listen()
        yields messages, through server restarts (with batch, a list of up
        to batch Messages taken at once); with slices, also None after
        each second or so with none, so the caller may look around."""
        def reserve(deadline):
            messages = self.engine.reserve(queue, deadline, batch)
            if not messages:
                return None
            return messages if batch else messages[0]
        return self._keep_waiting(reserve, idle, reconnect, slices)

    def ack(self, *ids):
        """Remove held messages for good; how many were still held (by
        this connection, on a beuss)."""
        return self.engine.ack(ids)

    def nack(self, *ids, delay=None, reason=None, undelivered=False):
        """Give held messages back: after delay seconds, or the server's
        retry schedule when delay is None (0: at once); reason is what
        their dead-letter record says if they die. undelivered: back at
        once, this delivery not counted (the consumer could not start on
        them). How many were held."""
        if delay is not None:
            delay = _number_text(delay)
            _delay(delay)           # refused as the server refuses it
        return self.engine.nack(ids, delay, None if reason is None else _arg(
            reason)[:MAX_REASON], undelivered)

    def touch(self, *ids):
        """Renew the leases of held messages; how many were still held."""
        return self.engine.touch(ids)

    def put_back(self, queue, message):
        """Return a message that could not be handled to the head of queue."""
        try:
            self.call(b"LPUSH", queue, message)
        except BeussError as exc:
            _warn("could not return a message of %d bytes to %s: %s"
                  % (len(message), _arg(queue).decode("utf-8", "replace"), exc))

    # Pub/sub ---------------------------------------------------------------

    def publish(self, channel, message):
        """Send message to the channel's subscribers now; return how many
        got it (none: the message is dropped, nothing keeps it). A cluster
        passes it to every node, but counts those of the node named."""
        return self.call(b"PUBLISH", channel, _arg(message))

    def subscribe(self, *channels, idle=None, reconnect=True):
        """Yield (channel, message) for each message published on the
        channels, for ever, or until none came for `idle` seconds. A name
        with *, ? or [ is a pattern. The connection is then the
        subscription's alone. Like listen(), it outlives a server restart,
        subscribing again; messages published meanwhile are missed."""
        names = [_arg(channel) for channel in channels]
        if not names:
            raise ValueError("subscribe() needs at least one channel")
        patterns = [name for name in names if _is_pattern(name)]
        commands = [[b"PSUBSCRIBE"] + patterns] if patterns else []
        if len(patterns) < len(names):
            commands.append([b"SUBSCRIBE"] + [name for name in names
                                              if not _is_pattern(name)])
        subscribed = []                 # the socket the subscriptions are on
        home = self._home               # a cluster passes on what it gets

        def wait_one(deadline):
            if home.sock is None or subscribed[-1:] != [home.sock]:
                # Confirmations are read as they come, with the messages.
                self._talk(commands, 0)
                subscribed.append(home.sock)
            return self._next_message(deadline)
        for channel, message in self._keep_waiting(wait_one, idle, reconnect):
            yield channel.decode("utf-8", "surrogateescape"), message

    def _next_message(self, deadline):
        # At most one slice's wait, so that Ctrl-C gets through everywhere.
        seconds = min(BLOCK_SLICE, max(deadline - time.monotonic(), 0.001))
        if not self._home.reader.buffered():
            import select
            if not select.select([self._home.sock], [], [], seconds)[0]:
                return None
        reply = self._talk([], 1)[0]
        if isinstance(reply, list) and reply[:1] == [b"message"]:
            return reply[1], reply[2]
        if isinstance(reply, list) and reply[:1] == [b"pmessage"]:
            return reply[2], reply[3]
        return None                     # a confirmation

    def len(self, queue):
        """How many messages queue holds."""
        return self.call(b"LLEN", queue)

    def delete(self, *queues):
        """Delete queues for good: their messages, those set aside for
        later, and of "<queue>.dead" the records too (held messages stay
        with their consumers); how many of them held ready messages."""
        return self.engine.delete(queues)

    def queues(self):
        """{name: length} of every queue that holds messages ready to be
        taken (over every primary of a cluster)."""
        return {name: counts[0] for name, counts in
                self.queue_counts().items() if counts[0]}

    def queue_counts(self):
        """{name: (ready, held, deferred)} of every queue that has a
        message in any of these states, over every primary of a cluster.
        On a Redis the companion keys of the scripts count with their
        queue (retries ready again are ready) and are not listed."""
        if self.serves_reserve():       # a beuss: every queue, at one moment
            import codecs
            counts = {}
            for name, sizes in _queue_lines(self.info()).items():
                row = tuple(int(sizes.get(key, 0))
                            for key in ("messages", "held", "deferred"))
                if any(row):            # INFO writes a name as repr() does
                    name = codecs.escape_decode(name.encode("latin-1"))[0]
                    counts[name.decode("utf-8", "surrogateescape")] = row
            return counts
        counts = {}
        for link in self._primaries():
            asks = {}                   # queue -> [(column, command, key)]
            for name in self._names(link):
                queue, part = _companion_of(name)
                if part == b"dead":
                    asks[name] = [(0, b"LLEN", name)]
                elif part is None or part in _COUNTED:
                    asks[queue] = [(0, b"LLEN", queue)] + [
                        (column, command, _companion(queue, part))
                        for part, (column, command) in _COUNTED.items()]
            # A queue's keys are counted in one transaction, all of them
            # whichever were there when listed: a message that moves between
            # them meanwhile (a lease running out) is counted once, where
            # counting key by key could miss it.
            commands = []
            for counted in asks.values():
                commands += [[b"MULTI"]] + [[command, key] for _, command, key
                                            in counted] + [[b"EXEC"]]
            replies = iter(link.talk(commands, len(commands)))
            for queue, counted in asks.items():
                *_, answers = itertools.islice(replies, len(counted) + 2)
                for (column, _, _), reply in zip(counted, answers if isinstance(
                        answers, list) else ()):
                    if isinstance(reply, int) and reply:
                        row = counts.setdefault(queue.decode(
                            "utf-8", "surrogateescape"), [0, 0, 0])
                        row[column] += reply
        return {name: tuple(row) for name, row in counts.items()}

    def info(self):
        """INFO of the server named, as {field: text}."""
        return _info_fields(self.call(b"INFO"))

    def infos(self):
        """[(host, port, INFO as info() gives it)] of every primary of a
        cluster, or of the one server."""
        return [(link.host, link.port, _info_fields(_raise(link.talk(
            [[b"INFO"]], 1)[0]))) for link in self._primaries()]


# A companion key counted with its queue: (its column, how it is counted).
_COUNTED = {b"again": (0, b"LLEN"), b"held": (1, b"ZCARD"),
            b"deferred": (2, b"ZCARD")}


def _info_fields(text):
    fields = {}
    for line in text.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#"):
            field, _, value = line.rpartition(":") if line.startswith(
                "queue_") else line.partition(":")
            fields[field] = value
    return fields


def _queue_lines(info):
    """{queue: {field: text}} of the queue_<name> lines of a beuss
    server's INFO (messages, bytes, waiters, held, deferred, in_per_sec,
    out_per_sec, oldest_age, busy, held_age); {} from Redis."""
    return {field[6:]: dict(part.split("=") for part in value.split(","))
            for field, value in info.items() if field.startswith("queue_")}


def _configured(lines):
    """{queue: its settings as text} of the queues with settings, from a
    beuss server's INFO queue lines."""
    found = {}
    for name, line in lines.items():
        text = _queue_settings_text({setting: line[setting.replace("-", "_")]
                                     for setting in QUEUE_SETTINGS
                                     if setting.replace("-", "_") in line})
        if text:
            found[name] = text
    return found


def _raise(reply):
    """reply, unless it is an error: then raise it."""
    if isinstance(reply, ReplyError):
        raise reply
    return reply


class Message:
    """A reserved message: .data (bytes), .queue (str), .id (bytes, as the
    server gave it), and .deliveries
    (this one included). ack() when it has been handled, nack() to give it
    back; `with message:` acks when the block ends and nacks if it raises,
    the exception as the reason. Both return whether the server still held
    it (a lease that ran out gave it to another). Against a server without
    RESERVE .id is None, ack() does nothing and nack() pushes the message
    back at once."""

    def __init__(self, client, queue, message_id, data, deliveries=1):
        self.client = client
        # Names come back as str everywhere (queues(), subscribe(), here):
        # UTF-8, other bytes kept as surrogates, so they go back unchanged.
        self.queue = _arg(queue).decode("utf-8", "surrogateescape")
        self.id = message_id
        self.data = data
        self.deliveries = deliveries

    def __repr__(self):
        return "<beuss.Message %r of %s: %d bytes>" % (
            self.id, self.queue, len(self.data))

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if kind is None:
            self.ack()
        else:
            self.nack(reason=_failure(exc))

    def ack(self):
        if self.id is None:
            return True
        return self.client.ack(self.id) == 1

    def touch(self):
        """Renew the lease: the message stays this consumer's for the
        lease's length from now. Whether it was still held."""
        return self.id is None or self.client.touch(self.id) == 1

    def nack(self, delay=None, reason=None, undelivered=False):
        """Give the message back, after delay seconds or the server's retry
        schedule; reason goes into its dead-letter record if it dies;
        undelivered: at once, this delivery not counted. A failure to give
        it back is said on stderr, since the server gives back what a
        closed connection held anyway."""
        if delay is not None:
            _delay(_number_text(delay))     # a bad delay is the caller's
        if self.id is None:
            self.client.put_back(self.queue, self.data)
            return True
        try:
            return self.client.nack(self.id, delay=delay, reason=reason,
                                    undelivered=undelivered) == 1
        except BeussError as exc:
            _warn("could not give back message %s: %s; the server does once "
                  "the connection closes" % (self.id.decode(), exc))
            return False


class DeadRecord:
    """A message of a dead-letter queue and why it died (Client.why)."""

    def __init__(self, message, deliveries, died, why):
        self.message = message
        self.deliveries = deliveries    # None: not a dead letter
        self.died = None if died is None else float(died)  # epoch seconds
        self.why = None if why is None else why.decode("utf-8", "replace")

    def __repr__(self):
        return "<beuss.DeadRecord after %s deliveries: %r>" % (
            self.deliveries, self.why)


def _failure(exc):
    """A handler's exception as a dead letter's reason."""
    text = str(exc).strip().splitlines()
    return (type(exc).__name__ + (": " + text[-1] if text else ""))[:MAX_REASON]


def _acknowledge(messages, reconnect):
    # If the server went away after the handler ran, it gives the messages
    # back and they are delivered again: at least once, never lost.
    ids = [message.id for message in messages if message.id is not None]
    if not ids:
        return                      # plain pops: nothing to acknowledge
    try:
        messages[0].client.ack(*ids)
    except ConnectionFailed as exc:
        if not reconnect:
            raise
        _warn("%s; %s handled but will be delivered again" % (
            exc, "message %s was" % ids[0].decode() if len(ids) == 1 else
            "%d messages were" % len(ids)))


def _give_back(messages, **how):
    """nack() each of a batch, from the last, so that those that go back
    at once keep their order at the head."""
    for message in reversed(messages):
        message.nack(**how)


def _is_pattern(name):
    return any(c in name for c in b"*?[")


def _host_bytes(host):
    """host for getaddrinfo: an ASCII name as bytes, since a str goes
    through the idna codec, whose import alone costs a one-shot command
    more than its connection does."""
    try:
        return host.encode("ascii")
    except UnicodeError:
        return host


def put(queue, message, delay=None, **conn):
    """Append message to queue on the server, now or once delay seconds
    have passed (see Client.put). conn: Client's settings (host, port,
    token, tls, tls_ca, timeout)."""
    with Client(**conn) as client:
        return client.put(queue, message, delay)


def get(queue, wait=None, **conn):
    """Take the head message of queue, or None (see Client.get)."""
    with Client(**conn) as client:
        return client.get(queue, wait)


def on(queue, handler, **conn):
    """Call handler(message) for each message of queue, for ever, or until
    SIGTERM or Ctrl-C, which lets the message in hand finish first."""
    with Client(**conn) as client:
        return client.on(queue, handler)


# ## Command line #############################################################

def _wrap(text, width):
    """text in lines of at most width, broken at spaces."""
    lines = [""]
    for word in text.split(" "):
        if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
            lines.append("")
        lines[-1] += (" " if lines[-1] else "") + word
    return "\n".join(lines)


def _usage():
    """--help's text: a line or two a verb, from VERBS, then the settings."""
    verbs = []
    for verb, (_, _, synopsis, summary) in VERBS.items():
        shown = "  %-19s " % (verb + synopsis)
        if len(shown) > 22:
            verbs.append(shown.rstrip())
            shown = " " * 22
        verbs.append(shown + _wrap(summary, 50).replace("\n", "\n" + " " * 22))
    return """\
usage: python beuss.py [VERB] [options]

%s

`python beuss.py VERB --help` tells a verb's options. Verbs may be written
in any case. Options may come before the verb. Settings come from flags,
else the environment, else the defaults (127.0.0.1:6552). The server's:
%s.
%s
Exit status: 0 done, 1 the queue was empty or the wait ran out, 2 usage
error, 3 the server could not be reached or refused the request, 4 a
message could not be written out or handled (it is back in its queue),
5 the server could not start, 6 the queue is full (PUT past a max-length
that rejects), 126 or 127 ON's --exec command could not be
run (the message is back as it was), 130 interrupted.
""" % ("\n".join(verbs), _wrap(", ".join(
        setting.env for setting in SETTINGS), 72), _wrap(
        "The clients': BHOST, BPORT, BTOKEN, BTLS, BTLSCA; GET and ON "
        "against a Redis also read %s (BLEASE is 60s there)." % ", ".join(
            setting.env for setting in SETTINGS
            if setting.name in _SCRIPT_SETTINGS), 72))

EXIT_OK, EXIT_EMPTY, EXIT_USAGE, EXIT_SERVER, EXIT_HANDLER = 0, 1, 2, 3, 4
EXIT_START = 5
EXIT_FULL = 6
EXIT_INTERRUPTED = 130


class UsageError(BeussError):
    """The command line was wrong: the user's fault, exit status 2."""


class StartFailed(BeussError):
    """SERVE could not start (the port, the store, TLS, protected mode):
    exit status 5."""


class HandlerFailed(BeussError):
    """A message could not be written out or handled: exit status 4."""


class CommandFailed(HandlerFailed):
    """The --exec command of a message exited with another status than 0:
    ON gives the message back and goes on (with RESERVE). .reason is what
    its dead-letter record says: the status and its last line of stderr."""

    reason = ""


class Stopped(SystemExit):
    """A consumer was told to stop (SIGTERM, Ctrl-C) while it waited, or
    told twice, or its message outlasted --stop-timeout: .status is 0 when
    nothing was in hand, else 128 + the signal (130, 143). Left uncaught,
    it ends the program quietly with that status."""

    def __init__(self, status):
        SystemExit.__init__(self, status)
        self.status = status


class _Stopper:
    """A consumer's clean stop, as `docker stop`, systemd and Kubernetes
    expect it: the first SIGTERM or Ctrl-C stops one that waits at once,
    and lets one that holds a message finish it (up to stop_timeout
    seconds), acknowledge it and stop; a second gives the message back and
    stops at once. Only the main thread can take signals: elsewhere this
    does nothing."""

    def __init__(self, stop_timeout=DEFAULT_STOP_TIMEOUT):
        self.stop_timeout = stop_timeout
        self.asked = None           # the signal that asked, or None
        self.deadline = None        # when the message in hand is given up
        self.busy = False           # a message is in hand
        self._before = {}           # the handlers to put back
        self.finished = False       # ended where they could not be

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._before[signum] = signal.signal(signum, self._signal)
        return self

    def __exit__(self, *exc_info):
        import threading
        if threading.current_thread() is threading.main_thread():
            self._put_back()
        else:
            # A listen() given up unfinished, closed by the collector in
            # another thread (PyPy's does): only the main thread may set
            # handlers, so the next signal puts them back, then comes again.
            self.finished = True

    def _put_back(self):
        import signal
        for signum, handler in self._before.items():
            signal.signal(signum, handler)
        self._before = {}

    def _signal(self, signum, frame):
        if self.finished:
            self._put_back()
            os.kill(os.getpid(), signum)
            return
        if self.asked is not None:
            raise Stopped(128 + signum)         # the second: at once
        self.asked = signum
        if not self.busy:
            raise Stopped(0)                    # waiting: nothing in hand
        self.deadline = time.monotonic() + self.stop_timeout
        _warn("stopping once the message in hand is done (within %s; "
              "again to stop at once)" % _plural(self.stop_timeout, "second"))

    def check(self):
        """While a message is in hand: give up if the stop waited enough."""
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise Stopped(128 + self.asked)


class CommandUnusable(HandlerFailed):
    """The --exec command could not be run at all (the shell's status 126,
    or 127: not found), and will not run for the next message either: ON
    gives the message back as it was and stops with that status."""

    def __init__(self, text, status):
        HandlerFailed.__init__(self, text)
        self.status = status


def main(argv=None):
    """Run the command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] in (["-h"], ["--help"], ["HELP"], ["help"]):
            sys.stdout.write(_usage())
            return EXIT_OK
        if argv[:1] == ["--version"]:
            print("beuss", __version__)
            return EXIT_OK
        verb = "SERVE"
        at = _verb_position(argv)
        if at is not None:
            verb = argv.pop(at).upper()     # options may come before it
        if verb not in VERBS:
            raise UsageError("unknown verb %r: the verbs are %s (--help "
                             "tells more)" % (verb, " ".join(VERBS)))
        run, add_arguments, _, summary = VERBS[verb]
        parser = _Parser(verb, summary)
        add_arguments(parser)
        options = parser.parse_args(argv)
        if options is None:         # --help was shown
            return EXIT_OK
        return run(options)
    except UsageError as exc:
        _warn(str(exc))
        return EXIT_USAGE
    except HandlerFailed as exc:
        _warn(str(exc))
        return getattr(exc, "status", EXIT_HANDLER)
    except Stopped as exc:
        return exc.status
    except StartFailed as exc:
        _warn(str(exc))
        return EXIT_START
    except ReplyError as exc:
        _warn(str(exc))
        return EXIT_FULL if str(exc).startswith("FULL ") else EXIT_SERVER
    except BeussError as exc:       # the server refused, or could not start
        _warn(str(exc))
        return EXIT_SERVER
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): end quietly, and keep Python from
        # complaining when it flushes stdout on the way out.
        _silence_stdout()
        return EXIT_OK


# Options that take no value: a verb may follow one directly.
_SWITCHES = {"-l", "--lines", "--no-protected-mode", "--channel", "--why", "--empty",
             "--tls", "-h", "--help"}


def _verb_position(argv):
    """Where the verb is: first, or after options given before it
    (`--port 7000 PUT q x`); None when there is none (SERVE)."""
    if argv and not argv[0].startswith("-"):
        return 0
    for i, word in enumerate(argv):
        if word.upper() in VERBS and i and (
                not argv[i - 1].startswith("-") or "=" in argv[i - 1]
                or argv[i - 1] in _SWITCHES):
            return i
    return None


class _Parser:
    """The options and arguments of one verb, read as argparse reads them
    (--name value, --name=value, -n value, -nvalue, --, positionals with
    nargs "?", "+" and "*"), with argparse's add_argument for describing them.
    Importing argparse, and the re, gettext, locale and shutil it brings,
    would cost a one-shot command 5 to 9 ms, most of its own start."""

    def __init__(self, verb, summary):
        self.verb, self.summary = verb, summary
        self._options = {}          # every spelling -> its _Argument
        self._arguments = []        # options and positionals, in order

    def add_argument(self, *names, **settings):
        argument = _Argument(names, **settings)
        self._arguments.append(argument)
        for name in names if argument.is_option else ():
            self._options[name] = argument

    def error(self, message):
        raise UsageError("%s: %s (try %s --help)" % (self.verb, message,
                                                      self.verb))

    def parse_args(self, argv):
        """The options as attributes, or None after showing --help."""
        options = _Options()
        for argument in self._arguments:
            setattr(options, argument.dest, argument.default)
        positionals, i = [], 0
        while i < len(argv):
            arg, i = argv[i], i + 1
            if arg == "--":
                positionals.extend(argv[i:])
                break
            if not arg.startswith("-") or arg == "-" or arg[1:2].isdigit():
                positionals.append(arg)
                continue
            if arg in ("-h", "--help"):
                sys.stdout.write(self.help())
                return None
            name, value = arg, None
            if arg.startswith("--") and "=" in arg:
                name, value = arg.split("=", 1)
            elif not arg.startswith("--") and len(arg) > 2:
                name, value = arg[:2], arg[2:]
            argument = self._options.get(name)
            if argument is None:
                import difflib
                close = difflib.get_close_matches(name, self._options, 1, 0.7)
                self.error("unrecognized argument %s%s" % (arg, (
                    "; did you mean %s?" % close[0]) if close else ""))
            if argument.action != "store":
                if value is not None:
                    self.error("%s takes no value" % name)
                setattr(options, argument.dest, argument.const)
                continue
            if value is None:
                if i == len(argv):
                    self.error("%s needs a value" % name)
                value, i = argv[i], i + 1
            setattr(options, argument.dest, self._convert(argument, name,
                                                          value))
        for argument in self._arguments:
            if argument.is_option:
                continue
            if argument.nargs in ("+", "*") and positionals:
                value = [self._convert(argument, argument.metavar, one)
                         for one in positionals]
                positionals = []
            elif positionals and argument.nargs not in ("+", "*"):
                value = self._convert(argument, argument.metavar,
                                      positionals.pop(0))
            elif argument.nargs in ("?", "*"):
                continue
            else:
                self.error("%s is missing" % argument.metavar)
            setattr(options, argument.dest, value)
        if positionals:
            self.error("unrecognized arguments: %s" % " ".join(positionals))
        return options

    def _convert(self, argument, name, value):
        if argument.type is None:
            return value
        try:
            return argument.type(value)
        except ValueError as exc:
            self.error("%s: %s" % (name, exc))

    def help(self):
        words = ["usage: python beuss.py", self.verb, "[options]"]
        lines = []
        for argument in self._arguments:
            if argument.is_option:
                shown = ", ".join(argument.names)
                if argument.action == "store":
                    shown += " " + argument.metavar
            else:
                shown = argument.metavar
                words.append({"?": "[%s]", "+": "%s...", "*": "[%s]..."}.get(
                    argument.nargs, "%s") % shown)
            lines.append("  %-24s %s" % (shown, argument.help or ""))
        return "%s\n\n%s\n\n%s\n" % (" ".join(words), _wrap(
            self.summary, 72), "\n".join(lines))


class _Argument:
    """One option or positional of a verb, as add_argument described it."""

    def __init__(self, names, action="store", const=None, nargs=None,
                 type=None, default=None, metavar=None, dest=None,
                 help=None):
        self.names = names
        self.is_option = names[0].startswith("-")
        long_name = [name for name in names if name.startswith("--")]
        self.dest = dest or (long_name or names)[0].lstrip("-").replace(
            "-", "_")
        self.action, self.nargs, self.type, self.help = action, nargs, type, help
        self.const = True if action == "store_true" else const
        self.default = False if action == "store_true" else default
        self.metavar = metavar or (self.dest.upper() if self.is_option
                                   else names[0])


class _Options:
    """What _Parser read: one attribute per option and positional."""


def _add_address(parser):
    parser.add_argument("--host", help="server host (BHOST; 127.0.0.1)")
    parser.add_argument("--port", help="server port (BPORT; 6552)")
    parser.add_argument("--token", help="the server's token (BTOKEN)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="read the token from FILE's first line")
    parser.add_argument("--tls", action="store_const", const="yes",
                        help="connect with TLS, checking the server's "
                        "certificate (BTLS=1)")
    parser.add_argument("--tls-ca", metavar="FILE",
                        help="trust the certificates in FILE (BTLSCA)")


def _client(options):
    try:
        return Client(options.host, options.port, token=_token(options),
                      tls=options.tls, tls_ca=options.tls_ca, **{
                          name: getattr(options, name, None)
                          for name in _SCRIPT_SETTINGS})
    except ValueError as exc:
        raise UsageError(str(exc))


def _add_script_settings(parser):
    for setting in SETTINGS:
        if setting.name in _SCRIPT_SETTINGS:
            parser.add_argument(setting.flag, metavar=setting.metavar,
                                dest=setting.name, help="on a Redis: %s (%s)"
                                % (setting.help, setting.env))


def _consumer(options, verb):
    """GET's and ON's client, named for CLIENT LIST. The lease and the
    retry schedule given on the command line are the consumer's on a Redis
    only: on a beuss they are the server's, and given here they would be
    ignored, so they are refused."""
    client = _client(options)
    command = getattr(options, "command", None)
    client.call_me(verb, os.path.basename(command.split()[0])
                   if command and command.split() else None)
    given = [name for name in _SCRIPT_SETTINGS
             if getattr(options, name, None) is not None]
    try:
        if given and client.serves_reserve():
            flag = "--" + given[0].replace("_", "-")
            raise UsageError("%s is the server's setting here: start the "
                             "server with it (python beuss.py %s %s)" % (
                                 flag, flag, getattr(options, given[0])))
    except BaseException:
        client.close()
        raise
    return client


def _token(options):
    """--token, else the first line of --token-file, else None (BTOKEN)."""
    if options.token_file is None:
        return options.token
    try:
        with open(options.token_file, encoding="utf-8") as source:
            return source.readline().strip()
    except (OSError, UnicodeError) as exc:
        raise UsageError("cannot read %s: %s" % (options.token_file,
                                                 _reason(exc)))


def _queue(name):
    if not name:
        raise UsageError("a queue name cannot be empty")
    return os.fsencode(name)


def _count(text):
    if not text.isdigit():
        raise ValueError("%r is not a count (a whole number, 0 or more)"
                         % text)
    return int(text)


def _reader_gone():
    """Whether stdout is a pipe whose reader has closed it (POSIX)."""
    import select
    import stat
    try:
        fd = sys.stdout.fileno()
        if not hasattr(select, "poll") or not stat.S_ISFIFO(
                os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, 0)      # only the error and hang-up conditions
        return any(events & (select.POLLERR | select.POLLHUP)
                   for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _silence_stdout():
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# SERVE ----------------------------------------------------------------------

def _serve_arguments(parser):
    for setting in SETTINGS:
        if setting.metavar is None:     # a switch, which gives "no"
            parser.add_argument(setting.flag, action="store_const",
                                const="no", dest=setting.name,
                                help="%s (%s=no)" % (setting.help, setting.env))
        else:
            parser.add_argument(setting.flag, metavar=setting.metavar,
                                dest=setting.name, help="%s (%s)" % (
                                    setting.help, setting.env))
    parser.add_argument("--token-file", metavar="FILE",
                        help="read the token from FILE's first line")


def run_serve(options):
    try:
        settings = {setting.name: _setting(
            _token(options) if setting.name == "token"
            else getattr(options, setting.name), setting.flag, setting.env,
            setting.default, setting.parse) for setting in SETTINGS}
    except ValueError as exc:
        raise UsageError(str(exc))
    host, port = settings.pop("host"), settings.pop("port")
    max_clients, data = settings["max_clients"], settings["data"]
    if settings["max_input"] is not None and \
            settings["max_input"] <= settings["max_message_size"]:
        raise UsageError("--max-input (%d bytes) must be more than "
                         "--max-message-size (%d bytes), or a message could "
                         "never be sent" % (settings["max_input"],
                                            settings["max_message_size"]))
    if data is None and (options.fsync or os.environ.get("BFSYNC")):
        raise UsageError("--fsync says when the --data file is synced; "
                         "without --data there is no file")
    # The handlers go in before the port opens: a signal that comes once
    # anyone can connect must stop the server cleanly, never half way.
    import signal
    servers, signals = [], []

    def stop(signum, frame):
        signals.append(signum)
        for server in servers:
            server.stop()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        server = Server((host, port), **settings)
    except OSError as exc:
        raise StartFailed("cannot listen on %s:%s: %s"
                          % (host, port, _reason(exc)))
    except BeussError as exc:
        raise StartFailed(str(exc))
    servers.append(server)
    if signals:
        server.stop()
    if server.max_clients < max_clients:
        _warn("serving at most %d clients: the system allows this process "
              "only %d open files" % (server.max_clients, server.max_clients
                                      + RESERVED_DESCRIPTORS))
    kept = "kept in %s, fsync %s: %s in %s found" % (
        data, server.fsync, _plural(server.queues.message_count()
                                    + server.queues.deferred_count(),
                                    "message"),
        _plural(len(server.queues), "queue")) if data else "in memory"
    if server.tls_cert is not None:
        kept += "; TLS only: clients connect with --tls"
    sys.stderr.write("beuss %s serving on %s port %d (messages up to %d bytes, "
                     "%s; Ctrl-C stops it)\n" % (
                         __version__, server.address[0], server.address[1],
                         server.max_message_size, kept))
    if server.http is not None:
        sys.stderr.write("status page at http://%s/ (also /metrics, "
                         "/status.json, /healthz)\n" % _address_text(
                             server.http))
    sys.stderr.flush()
    server.serve_forever()
    if server.unsaved:
        _warn("stopped, but the last %s could not be written to %s (%s); "
              "no client was told they were made" % (
                  _plural(server.unsaved, "change"), data,
                  server.store.failing))
        return EXIT_SERVER
    sys.stderr.write("beuss stopped\n")
    return EXIT_OK


# PUT ------------------------------------------------------------------------

def _put_arguments(parser):
    parser.add_argument("queue", help="the queue's name")
    parser.add_argument("-d", "--delay", type=_duration, metavar="TIME",
                        help="the message joins the queue once TIME has "
                        "passed (seconds, or 500ms, 30s, 5m, 2h)")
    parser.add_argument("--ttl", type=_duration, metavar="TIME",
                        help="if no consumer took it within TIME, it goes to "
                        "<queue>.dead (expired after TIME)")
    parser.add_argument("--id", metavar="KEY",
                        help="put it only if no message was put with KEY on "
                        "the queue within its dedup-window (5m): a retry "
                        "after a timeout does not put it twice")
    _add_message_source(parser)


def _add_message_source(parser):
    # PUT's and PUB's: where the message comes from.
    parser.add_argument("message", nargs="?",
                        help="the message; without it, all of stdin")
    parser.add_argument("-l", "--lines", action="store_true",
                        help="each line of stdin is a message of its own")
    parser.add_argument("-f", "--file", help="send the contents of FILE")
    parser.add_argument("--empty", action="store_true",
                        help="an empty stdin or FILE is an empty message "
                        "(else it is refused: a failed command before the "
                        "pipe puts nothing)")
    _add_address(parser)


def run_put(options):
    queue = _queue(options.queue)
    for given in ("id", "ttl"):
        if getattr(options, given) is not None and (options.lines or
                                                    options.delay):
            raise UsageError("--%s puts one message now: not with %s" % (
                given, "--lines" if options.lines else "--delay"))
    if options.ttl == 0:
        raise UsageError("--ttl is more than 0 seconds")
    messages = _messages(options, "PUT")
    with _client(options) as client:
        try:
            if options.lines:
                client.put_many(queue, messages, options.delay)
            elif client.put(queue, messages[0], options.delay, options.id,
                            options.ttl) == 0:
                _warn("already queued: a message with id %s was put on %s "
                      "within its dedup-window; this one was not" % (
                          options.id, options.queue))
        except ReplyError as exc:
            if str(exc).startswith("ERR message too large"):
                raise ReplyError("%s; the server takes larger messages when "
                                 "started with --max-message-size (or "
                                 "BMAXMESSAGESIZE)" % exc)
            if str(exc).startswith("FULL "):
                raise ReplyError("%s: nothing more was put (QUEUE %s shows "
                                 "its settings)" % (exc, options.queue))
            raise
    return EXIT_OK


def _messages(options, verb):
    """The messages PUT or PUB sends: the argument, the file, stdin, or
    each line of stdin (--lines, without its line end)."""
    if options.message is not None and (options.file or options.lines):
        raise UsageError("%s takes a message, --file or stdin, not two" % verb)
    if options.message is not None:
        return [os.fsencode(options.message)]
    # Read no more than one message can be (the protocol's limit), and say
    # so before reading a file that is larger.
    most = None if options.lines else MAX_BULK_LENGTH + 1
    if options.file:
        source = "the file %s" % options.file
        try:
            if most and os.path.getsize(options.file) >= most:
                raise UsageError(_too_large(source))
            with open(options.file, "rb") as reader:
                data = reader.read(most)
        except OSError as exc:
            raise UsageError("cannot read %s: %s" % (options.file, _reason(exc)))
    else:
        source = "stdin"
        if sys.stdin is None:
            raise UsageError("%s needs a message: an argument, --file or "
                             "stdin" % verb)
        if sys.stdin.isatty():
            _warn("reading the message from the terminal; end it with "
                  "Ctrl-D (Ctrl-Z Enter on Windows)")
        data = sys.stdin.buffer.read(most) if most else sys.stdin.buffer.read()
    if most and len(data) >= most:
        raise UsageError(_too_large(source))
    if not data and not options.empty:
        raise UsageError("%s is empty: nothing to %s (--empty %s an empty "
                         "message)" % (source, verb.lower(), "puts" if verb ==
                                       "PUT" else "publishes"))
    if not options.lines:
        return [data]
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _too_large(source):
    return ("%s is larger than a message can be: 512 MiB (%d bytes) is the "
            "limit of the protocol, whatever the server's --max-message-size"
            % (source, MAX_BULK_LENGTH))


# GET ------------------------------------------------------------------------

def _get_arguments(parser):
    parser.add_argument("queue", help="the queue's name")
    parser.add_argument("file", nargs="?", default="-",
                        help="where to write the message (- or none: stdout)")
    parser.add_argument("-w", "--wait", type=_duration, metavar="SECONDS",
                        help="wait up to SECONDS for a message (0: for ever)")
    _add_script_settings(parser)
    _add_address(parser)


def run_get(options):
    queue = _queue(options.queue)
    with _consumer(options, "GET") as client:
        # The target is opened before the message is taken, so a place that
        # cannot be written loses nothing.
        target = _Target(options.file)
        try:
            message = client.reserve(queue, options.wait)
            if message is None:
                return _empty(options.queue, options.wait)
            try:
                target.write(message.data)
            except HandlerFailed as exc:
                message.nack(delay=0)
                raise HandlerFailed("%s; the message is back at the head of "
                                    "%s" % (exc, options.queue))
            message.ack()       # only once the message is written out
        finally:
            target.close()
    return EXIT_OK


class _Target:
    """Where GET writes a message: stdout ("-"), or a file. A regular file
    (or a new one) is written under a temporary name beside it and renamed
    into place once whole, so that a half-written file never appears; it
    keeps the mode of the file it replaces, and a new one gets what a shell
    redirect would give it. Anything else (a FIFO, a device, a symlink) is
    written into as `cat > path` would. A failure raises HandlerFailed."""

    def __init__(self, path):
        import stat
        self.path, self.temporary, self.file = path, None, None
        if path == "-":
            if sys.stdout is None:          # started with stdout closed
                raise HandlerFailed("cannot write the message: stdout is "
                                    "closed; nothing was taken")
            return
        try:
            before = os.lstat(path)
        except FileNotFoundError:
            before = None
        except OSError as exc:
            raise HandlerFailed("cannot write %s: %s" % (path, _reason(exc)))
        try:
            if before is not None and not stat.S_ISREG(before.st_mode):
                self.file = open(path, "wb")
                return
            import tempfile
            fd, self.temporary = tempfile.mkstemp(
                dir=os.path.dirname(os.path.abspath(path)), prefix=".beuss-")
            self.file = os.fdopen(fd, "wb")
            if before is not None:
                mode = stat.S_IMODE(before.st_mode)
            else:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            os.chmod(self.temporary, mode)
        except OSError as exc:
            self.close()
            raise HandlerFailed("cannot write %s: %s" % (path, _reason(exc)))

    def write(self, message):
        if self.path == "-":
            try:
                _write_stdout(message)
            except BrokenPipeError:
                raise HandlerFailed("stdout was closed before the message "
                                    "was written")
            return
        try:
            with self.file:
                self.file.write(message)
            if self.temporary is not None:
                os.replace(self.temporary, self.path)
                self.temporary = None
        except OSError as exc:
            raise HandlerFailed("cannot write %s: %s" % (self.path,
                                                         _reason(exc)))

    def close(self):
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
        if self.temporary is not None and os.path.exists(self.temporary):
            os.remove(self.temporary)


def _empty(queue, wait):
    _warn("queue %s is empty" % queue if not wait else
          "no message on queue %s within %s" % (queue, _plural(wait, "second")))
    return EXIT_EMPTY


def _write_stdout(data):
    """Write data to stdout now. A closed pipe raises BrokenPipeError;
    any other failure raises HandlerFailed, and stdout is silenced so that
    Python does not complain again on the way out."""
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except BrokenPipeError:
        _silence_stdout()
        raise
    except (OSError, ValueError, AttributeError) as exc:
        _silence_stdout()
        reason = _reason(exc) if isinstance(exc, OSError) else "it is closed"
        raise HandlerFailed("cannot write to stdout: %s" % reason)


# ON -------------------------------------------------------------------------

def _on_arguments(parser):
    parser.add_argument("queue", help="the queue's name")
    parser.add_argument("-b", "--batch", type=_count, metavar="N",
                        help="take up to N messages at once, in one round "
                        "trip, and acknowledge them together; --exec gets "
                        "them all on its stdin, each ended by the separator")
    _add_script_settings(parser)
    _add_handling(parser)


def _add_handling(parser):
    # ON's and SUB's: what is done with each message, and when to stop.
    parser.add_argument("-x", "--exec", metavar="CMD", dest="command",
                        help="run CMD (by the shell) for each message, the "
                        "message on its stdin (SUB: its channel in "
                        "BEUSS_CHANNEL)")
    parser.add_argument("-C", "--count", type=_count, metavar="N",
                        help="stop after N messages")
    parser.add_argument("-W", "--timeout", type=_duration, metavar="SECONDS",
                        help="stop when no message came for SECONDS")
    parser.add_argument("--stop-timeout", type=_duration, metavar="SECONDS",
                        default=DEFAULT_STOP_TIMEOUT,
                        help="after SIGTERM or Ctrl-C, the time the message "
                        "in hand has to finish before it is given back "
                        "(%gs; a second signal gives it back at once)"
                        % DEFAULT_STOP_TIMEOUT)
    _add_separator(parser)
    _add_address(parser)


def _add_separator(parser):
    parser.add_argument("-s", "--separator", default="\\n", metavar="TEXT",
                        help="write TEXT after each message (\\n, \\t, \\0 "
                        "and \\\\ are understood); a line end by default, "
                        "so that `| head -1` takes one; '' for the bytes "
                        "alone, back to back")


def run_on(options):
    queue = _queue(options.queue)
    handle = _handler(options, "its message goes back to %s after the retry "
                      "delay, or to %s.dead after its last delivery"
                      % (options.queue, options.queue))
    handled = 0
    separator = _unescape(options.separator)
    with _consumer(options, "ON") as client, _Stopper(options.stop_timeout) \
            as options.stopper:
        batches = client.reservations(queue, options.timeout, slices=True,
                                      batch=options.batch or 1)
        renew = None                # a long --exec keeps its lease
        if client.lease:
            renew = (lambda: [message.touch() for message in messages],
                     client.lease / 3)
        while options.count != handled and options.stopper.asked is None:
            messages = next(batches, StopIteration)
            if messages is StopIteration:
                break
            if messages is None:
                # While it waits, ON notices a reader that went away (`|
                # head`), rather than wait for a message to write.
                if options.command is None and _reader_gone():
                    _silence_stdout()
                    return EXIT_OK
                continue
            if options.count is not None:   # no more than --count asks
                _give_back(messages[options.count - handled:], delay=0)
                messages = messages[:options.count - handled]
            options.stopper.busy = True
            try:
                # A batch goes to --exec at once, each message ended by the
                # separator; alone, a message goes as it is.
                data = messages[0].data
                if options.batch:
                    data = separator.join(message.data for message in messages)
                    if options.command:     # stdout ends each with it anyway
                        data += separator
                handle(data, None, messages[0].deliveries, renew)
            except CommandUnusable as exc:
                _give_back(messages, undelivered=True)
                raise CommandUnusable("%s; %s back at the head of %s as it "
                                      "was, and ON stops" % (
                                          exc, "the message is" if len(
                                              messages) == 1 else "the "
                                          "messages are", options.queue),
                                      exc.status)
            except CommandFailed as exc:
                _give_back(messages, reason=exc.reason)
                if messages[0].id is None:
                    raise           # plain pops: no count of tries to stop
                _warn(str(exc))
                continue
            except BaseException:
                # A second stop, a closed pipe, stdout that cannot be
                # written: none is the message's fault, so it goes back at
                # once.
                _give_back(messages, delay=0)
                raise
            _acknowledge(messages, True)
            options.stopper.busy = False
            handled += len(messages)
    if options.timeout is not None and not handled and options.count != 0:
        return _empty(options.queue, options.timeout)
    return EXIT_OK


def _handler(options, after_failure):
    """handle(message, channel) as ON and SUB do it: run --exec with the
    message on its stdin (and the channel in BEUSS_CHANNEL), or write the
    message to stdout, after the channel with --channel, then the
    separator. A failure raises HandlerFailed; a closed pipe raises
    BrokenPipeError, which ends the command quietly."""
    separator = _unescape(options.separator)
    if options.command:
        def handle(message, channel, deliveries=None, renew=None):
            import subprocess
            sys.stdout.flush()
            env = dict(os.environ)
            if channel is not None:
                env["BEUSS_CHANNEL"] = channel
            if deliveries is not None:
                env["BEUSS_DELIVERIES"] = str(deliveries)
            # Its stderr passes through, and its last line says why.
            # In a session of its own, so that a Ctrl-C meant for ON (its
            # clean stop) does not end the command in the middle.
            process = subprocess.Popen(options.command, shell=True, env=env,
                                       stdin=subprocess.PIPE,
                                       stderr=subprocess.PIPE,
                                       start_new_session=os.name == "posix")
            stderr = _communicate(process, message, renew,
                                  getattr(options, "stopper", None))
            sys.stderr.buffer.write(stderr) if hasattr(
                sys.stderr, "buffer") else sys.stderr.write(
                    stderr.decode("utf-8", "replace"))
            sys.stderr.flush()
            if process.returncode in (126, 127):
                raise CommandUnusable("%r could not be run (exit status %d: "
                                      "the shell %s)" % (
                                          options.command, process.returncode,
                                          "found no such command"
                                          if process.returncode == 127 else
                                          "could not run it"),
                                      process.returncode)
            if process.returncode != 0:
                exc = CommandFailed("%r exited with status %d; %s" % (
                    options.command, process.returncode, after_failure))
                lines = stderr.decode("utf-8", "replace").strip()
                exc.reason = "exit status %d" % process.returncode + (
                    ": " + lines.splitlines()[-1][:200] if lines else "")
                raise exc
        return handle

    def handle(message, channel, deliveries=None, renew=None):
        head = b""
        if channel is not None and getattr(options, "channel", False):
            head = os.fsencode(channel) + b" "
        try:
            _write_stdout(head + message + separator)
        except HandlerFailed as exc:
            raise HandlerFailed("%s; %s" % (exc, after_failure))
        if deliveries is not None:
            _await_reader()
    return handle


_stdout_is_pipe = None


def _await_reader():
    """When stdout is a pipe, wait until its reader has read what the pipe
    holds: a message ON writes counts as written once read, so `ON q |
    head -1` takes one message, never a second that sat unread in the
    pipe. BrokenPipeError when the reader went away first. Elsewhere (a
    file, a terminal, or a system without FIONREAD) at once."""
    global _stdout_is_pipe
    import stat
    try:
        fd = sys.stdout.fileno()
        if _stdout_is_pipe is None:
            _stdout_is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
        if not _stdout_is_pipe:
            return
        import fcntl
        import struct
        import termios
        pause = 0.0005
        while struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD,
                                             b"\0\0\0\0"))[0]:
            if _reader_gone():
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        else:
            return
    except (ImportError, OSError, ValueError, AttributeError):
        _stdout_is_pipe = False     # no way to tell here
        return
    _silence_stdout()
    raise BrokenPipeError("the reader went away before reading the message")


def _communicate(process, message, renew, stopper=None):
    """Give process message on its stdin and wait for it to end; return
    its stderr. renew: (a function, seconds) to call it every so often
    meanwhile (a lease kept while a long command works); stopper: a
    _Stopper whose deadline may end the wait."""
    import subprocess
    every = renew[1] if renew else None
    if stopper is not None:
        every = min(every or 0.2, 0.2)
    renewed = time.monotonic()
    try:
        data = message
        while True:
            try:
                return process.communicate(data, every)[1]
            except subprocess.TimeoutExpired:
                data = None         # what is left of it is still fed
                if stopper is not None:
                    stopper.check()
                if renew and time.monotonic() - renewed >= renew[1]:
                    renewed = time.monotonic()
                    renew[0]()
    except BaseException:
        process.kill()
        process.wait()
        raise


def _unescape(text):
    escapes = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\"}
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1:i + 2] in escapes:
            out.append(escapes[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return os.fsencode("".join(out))


# LEN, LIST, PING, STATS -----------------------------------------------------

def _queue_argument(parser):
    parser.add_argument("queue", help="the queue's name")
    _add_address(parser)


def run_len(options):
    queue = _queue(options.queue)
    with _client(options) as client:
        print(client.len(queue))
    return EXIT_OK


def run_list(options):
    with _client(options) as client:
        counts = client.queue_counts()
        lines = _queue_lines(client.info()) if counts else {}
        paused = client.paused_queues()
        configured = client.engine.configured()
        for name in paused + list(configured):
            counts.setdefault(name, (0, 0, 0))
    if not counts:
        _warn("no queues: every queue is empty")
    for name, (length, held, deferred) in sorted(counts.items()):
        line = lines.get(name, {})
        notes = ([_plural(held, "held", "held")] if held else []) + (
            [_plural(deferred, "deferred", "deferred")] if deferred else []) + (
            ["%s busy" % line["busy"]] if int(line.get("busy", 0)) else []) + (
            ["%s waiting" % line["waiters"]] if int(line.get("waiters", 0))
            else []) + (["paused"] if name in paused else []) + (
            [configured[name]] if name in configured else [])
        print("%s %d%s" % (name, length, " (%s)" % ", ".join(notes)
                           if notes else ""))
    return EXIT_OK


def _peek_arguments(parser):
    parser.add_argument("queue", help="the queue's name")
    parser.add_argument("count", nargs="?", type=_count, default=1,
                        metavar="N", help="how many messages (1)")
    parser.add_argument("--why", action="store_true",
                        help="of a dead-letter queue (<queue>.dead): a line "
                        "each, when it died, after how many deliveries, why, "
                        "and the message's start")
    _add_separator(parser)
    _add_address(parser)


def run_peek(options):
    queue = _queue(options.queue)
    if options.why:
        return _print_why(options, queue)
    with _client(options) as client:
        messages = client.call(b"LRANGE", queue, 0, options.count - 1) \
            if options.count else []
    if not messages and options.count:
        return _empty(options.queue, None)
    separator = _unescape(options.separator)
    _write_stdout(b"".join(message + separator for message in messages))
    return EXIT_OK


def _print_why(options, queue):
    with _client(options) as client:
        records = client.why(queue)[:options.count]
    if not records:
        return _empty(options.queue, None)
    for record in records:
        start = record.message[:60].decode("utf-8", "backslashreplace")
        start = start.replace("\n", "\\n") + (
            "..." if len(record.message) > 60 else "")
        if record.why is None:
            print("(not a dead letter)  %s" % start)
            continue
        print("%s  after %s: %s  |  %s" % (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.died)),
            _plural(record.deliveries, "delivery", "deliveries"),
            record.why, start))
    return EXIT_OK


def _queue_settings_arguments(parser):
    parser.add_argument("queue", help="the queue's name")
    parser.add_argument("settings", nargs="*", metavar="SETTING VALUE",
                        help="settings to change: %s" % ", ".join(
                            QUEUE_SETTINGS))
    parser.add_argument("--reset", action="store_true",
                        help="put every setting back to its default first")
    _add_address(parser)


def run_queue(options):
    queue = _queue(options.queue)
    words = options.settings or []
    if len(words) % 2:
        raise UsageError("QUEUE takes settings in pairs: a name and its "
                         "value (max-length 10000)")
    try:
        _queue_settings(words)
    except ReplyError as exc:
        raise UsageError(str(exc)[4:])
    with _client(options) as client:
        if options.reset:
            client.configure(queue, reset=True)
        if words:
            client.engine.queue(b"SET", queue, words)
        settings = client.settings(queue)
    for name, value in settings.items():
        print(name, _queue_value(value))
    return EXIT_OK


def _pause_arguments(parser):
    parser.add_argument("queue", nargs="+", help="the queues' names")
    _add_address(parser)


def run_pause(options, paused=True):
    queues = [_queue(name) for name in options.queue]
    with _client(options) as client:
        changed = client.pause(*queues, paused=paused)
    _warn("%s %s%s" % ("paused" if paused else "resumed", " ".join(
        options.queue), "" if changed == len(queues) else " (%d of them "
        "already were)" % (len(queues) - changed)))
    return EXIT_OK


def _redrive_arguments(parser):
    parser.add_argument("queue", help="the queue's name")
    parser.add_argument("count", nargs="?", type=_count, metavar="N",
                        help="how many (all by default)")
    _add_address(parser)


def run_redrive(options):
    queue = _queue(options.queue)
    if options.count == 0:
        raise UsageError("REDRIVE moves at least one message")
    with _client(options) as client:
        print(client.redrive(queue, options.count))
    return EXIT_OK


def _del_arguments(parser):
    parser.add_argument("queue", nargs="+", help="the queues' names")
    _add_address(parser)


def run_del(options):
    queues = [_queue(name) for name in options.queue]
    with _client(options) as client:
        print(client.delete(*queues))
    return EXIT_OK


def run_ping(options):
    with _client(options) as client:
        reply = client.call(b"PING")
    print(reply)
    return EXIT_OK


def run_stats(options):
    with _client(options) as client:
        nodes = client.infos()
        version = nodes[0][2].get("beuss_version")
        counts = None if version else client.queue_counts()
        configured = client.engine.configured()
    if len(nodes) > 1:
        print("a Redis Cluster of %d primaries" % len(nodes))
    for host, port, info in nodes:
        server = ("beuss " + version if version else
                  "redis " + info.get("redis_version", "?"))
        uptime = int(info.get("uptime_in_seconds", 0))
        print("%s on %s:%d, up %dh %02dm %02ds" % (
            server, host, port, uptime // 3600, uptime // 60 % 60,
            uptime % 60))
        print("clients: %s connected, %s waiting" % (
            info.get("connected_clients", "?"),
            info.get("blocked_clients", "?")))
        if not version:
            print("memory: %s" % info.get("used_memory_human", "?"))
    if version:
        info = nodes[0][2]
        print("queues: %s holding %s (%s of memory); %s held by clients, "
              "%s deferred" % (
                  info.get("queues"), _plural(int(info.get("messages", 0)),
                                              "message"),
                  _size_text(int(info.get("used_memory", 0))),
                  info.get("held"), info.get("deferred", 0)))
        for name, sizes in sorted(_queue_lines(info).items()):
            print("  %s%s: %s, %s, %s waiting, %s held, %s deferred, "
                  "%s in/s, %s out/s; consumers: %s busy%s, %s waiting" % (
                      name, " (paused)" if sizes.get("paused") == "1" else "",
                      _plural(int(sizes["messages"]), "message"),
                      _size_text(int(sizes["bytes"])), sizes["waiters"],
                      sizes["held"], sizes.get("deferred", 0),
                      sizes.get("in_per_sec", "0"),
                      sizes.get("out_per_sec", "0"), sizes.get("busy", "?"),
                      " (the oldest hold %s)" % _age_text(int(sizes[
                          "held_age"])) if int(sizes.get("held_age", 0))
                      else "", sizes["waiters"]) + (
                          "; " + configured[name] if name in configured
                          else ""))
    else:
        for name, (ready, held, deferred) in sorted(counts.items()):
            print("  %s: %d ready, %d held, %d deferred%s" % (
                name, ready, held, deferred, "; " + configured[name]
                if name in configured else ""))
    return EXIT_OK


# TOP ------------------------------------------------------------------------

_SPARKS = "\u2581\u2582\u2583\u2584\u2585\u2586\u2587\u2588"


def _top_arguments(parser):
    parser.add_argument("-i", "--interval", type=_duration, default=1.0,
                        metavar="SECONDS", help="refresh every SECONDS (1)")
    _add_address(parser)


def run_top(options):
    """The queues, refreshed until Ctrl-C or q on a terminal; one snapshot
    when stdout is not one."""
    import shutil
    live = sys.stdout is not None and sys.stdout.isatty()
    depths = {}                         # queue -> recent depths, for sparks
    with _client(options) as client, _KeyPress() as keys:
        while True:
            width = shutil.get_terminal_size((80, 24)).columns
            text = _top_text(client, depths, width)
            if not live:
                sys.stdout.write(text)
                return EXIT_OK
            sys.stdout.write("\x1b[H\x1b[2J" + text + "q quits\n")
            sys.stdout.flush()
            if keys.wait(options.interval) in ("q", "Q"):
                return EXIT_OK


# TOP's columns after the queue's name: (title, width, its value in a row),
# shown while they fit, the depth's sparkline last with what is left.
_TOP_NAME = 20
_TOP_COLUMNS = [
    ("ready", 8, lambda row: row["messages"]),
    ("held", 6, lambda row: row.get("held", "-")),
    ("deferred", 8, lambda row: row.get("deferred", "-")),
    ("dead", 6, lambda row: row["dead"]),
    ("busy/wait", 9, lambda row: "%s/%s" % (row.get("busy", "-"),
                                            row.get("waiters", "-"))),
    ("in/s", 8, lambda row: row.get("in_per_sec", "-")),
    ("out/s", 8, lambda row: row.get("out_per_sec", "-")),
    ("oldest", 7, lambda row: _age_text(int(row["oldest_age"]))
     if "oldest_age" in row else "-")]


def _top_text(client, depths, width=80):
    """TOP's screen, width columns wide: columns drop from the right, and a
    long queue name is cut with an ellipsis."""
    info = client.info()
    title = "%s on %s:%d: %s clients, %s waiting, %s of memory" % (
        "beuss " + info["beuss_version"] if "beuss_version" in info
        else "redis " + info.get("redis_version", "?"), client.host,
        client.port, info.get("connected_clients", "?"),
        info.get("blocked_clients", "?"),
        _size_text(int(info.get("used_memory", 0))))
    rows = _queue_lines(info)
    if not rows:                        # Redis: counts, no rates
        rows = {name: {"messages": ready, "held": held, "deferred": deferred}
                for name, (ready, held, deferred)
                in client.queue_counts().items()}
    # Dead letters show in their queue's row, not as a row of their own.
    for name in [name for name in rows if name.endswith(".dead")]:
        rows.setdefault(name[:-len(".dead")], {"messages": "0"})
    for name, row in rows.items():
        on_redis = os.fsdecode(_companion(os.fsencode(name), b"dead"))
        row["dead"] = rows.get(name + ".dead", rows.get(on_redis, {})).get(
            "messages", 0)
    shown, used = [], _TOP_NAME
    for column in _TOP_COLUMNS:
        if used + 1 + column[1] > width:
            break
        shown.append(column)
        used += 1 + column[1]
    sparks = min(width - used - 2, 30)

    def line(name, cells, spark=""):
        if rows.get(name, {}).get("paused") == "1":
            name = "\u2016" + name         # paused: a pause sign first
        if "max_length" in rows.get(name.lstrip("\u2016"), {}):
            name += "\u2264" + rows[name.lstrip("\u2016")]["max_length"]
        text = ("%-*s" % (_TOP_NAME, name if len(name) <= _TOP_NAME
                          else name[:_TOP_NAME - 1] + "\u2026"))
        for (_, size, _), cell in zip(shown, cells):
            text += " %*s" % (size, cell)
        return (text + ("  " + spark if sparks >= 5 and spark else "")).rstrip()
    lines = [title[:width], "", line("queue", [column[0] for column in shown],
                                     "depth" if sparks >= 5 else "")]
    for name in sorted((name for name in rows if not name.endswith(".dead")),
                       key=lambda name: -int(rows[name]["messages"])):
        row = rows[name]
        history = depths.setdefault(name, collections.deque(maxlen=30))
        history.append(int(row["messages"]))
        top = max(history) or 1
        spark = "".join(_SPARKS[min(depth * 8 // (top + 1), 7)]
                        for depth in list(history)[-sparks:]) if sparks > 0 \
            else ""
        lines.append(line(name, [column[2](row) for column in shown], spark))
    if not rows:
        lines.append("(no queues)")
    return "\n".join(lines) + "\n"


class _KeyPress:
    """Single keys from a terminal's stdin, without Enter, while it lasts."""

    def __enter__(self):
        self.saved = None
        if os.name == "posix" and sys.stdin is not None and sys.stdin.isatty():
            import termios
            import tty
            self.saved = termios.tcgetattr(sys.stdin.fileno())
            tty.setcbreak(sys.stdin.fileno())
        return self

    def wait(self, seconds):
        """A key pressed within seconds, or None."""
        if os.name == "nt":
            import msvcrt
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if msvcrt.kbhit():
                    return msvcrt.getwch()
                time.sleep(0.05)
            return None
        if self.saved is None:
            time.sleep(seconds)
            return None
        import select
        if select.select([sys.stdin], [], [], seconds)[0]:
            return os.read(sys.stdin.fileno(), 1).decode("utf-8", "replace")
        return None

    def __exit__(self, *exc_info):
        if self.saved is not None:
            import termios
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN,
                              self.saved)


# PUB, SUB ---------------------------------------------------------------------

def _pub_arguments(parser):
    parser.add_argument("channel")
    _add_message_source(parser)


def run_pub(options):
    channel = _queue(options.channel)
    messages = _messages(options, "PUB")
    with _client(options) as client:
        received = [client.publish(channel, message) for message in messages]
        # A cluster's node counts its own subscribers only.
        alone = len(client._primaries()) == 1
    if alone and not any(received):
        _warn("no subscriber on channel %s: the message was dropped"
              % options.channel if len(messages) == 1 else
              "no subscriber on channel %s: the messages were dropped"
              % options.channel)
    return EXIT_OK


def _sub_arguments(parser):
    parser.add_argument("channels", nargs="+", metavar="channel",
                        help="a channel, or a pattern (with * ? or [)")
    parser.add_argument("--channel", action="store_true",
                        help="write each message's channel and a space "
                        "before it")
    _add_handling(parser)


def run_sub(options):
    channels = [_queue(name) for name in options.channels]
    handle = _handler(options, "it is not published again")
    handled = 0
    with _client(options) as client, _Stopper(options.stop_timeout) \
            as options.stopper:
        if options.count != 0:
            for channel, message in client.subscribe(
                    *channels, idle=options.timeout):
                options.stopper.busy = True
                handle(message, channel)
                options.stopper.busy = False
                handled += 1
                if handled == options.count or options.stopper.asked:
                    break
    if options.timeout is not None and not handled and options.count != 0:
        _warn("no message on %s within %s" % (" ".join(options.channels),
                                               _plural(options.timeout,
                                                       "second")))
        return EXIT_EMPTY
    return EXIT_OK


# BENCH ----------------------------------------------------------------------

def _bench_arguments(parser):
    parser.add_argument("-n", "--messages", type=_count, default=100000,
                        help="messages to put, then take (100000)")
    parser.add_argument("-c", "--clients", type=_count, default=50,
                        help="connections at once (50)")
    parser.add_argument("-P", "--pipeline", type=_count, default=1,
                        help="requests a connection sends at once (1)")
    parser.add_argument("-d", "--size", type=_count, default=3,
                        help="bytes a message (3)")
    _add_address(parser)


def run_bench(options):
    """Put n messages with RPUSH, then take them with LPOP, over many
    connections, and print the rate of each and the latency of a round
    trip. The load comes from one selectors loop that sends ready-made
    requests and counts reply line ends instead of parsing replies, so that
    it costs far less than the server it measures."""
    if min(options.messages, options.clients, options.pipeline) < 1:
        raise UsageError("BENCH: -n, -c and -P must be at least 1")
    client = _client(options)
    queue = b"beuss-bench-%d" % os.getpid()
    message = b"x" * options.size
    with client:
        client.call(b"DEL", queue)
        address = client.node_address(queue)    # on a cluster, its node's
        try:
            for name, command, line_ends in (
                    ("PUT (RPUSH)", [b"RPUSH", queue, message], 1),
                    ("GET (LPOP)", [b"LPOP", queue], 2)):
                seconds, latencies = _bench_load(
                    client, address, name, encode_bulks(command), line_ends,
                    options)
                latencies.sort()
                print("%-12s %9.0f messages/s  latency p50 %.2f ms, p99 %.2f "
                      "ms, max %.2f ms  (%s in %.2f s, %s, pipeline %d)" % (
                          name, options.messages / seconds,
                          1000 * latencies[len(latencies) // 2],
                          1000 * latencies[len(latencies) * 99 // 100],
                          1000 * latencies[-1],
                          _plural(options.messages, "message"), seconds,
                          _plural(options.clients, "client"),
                          options.pipeline))
        finally:
            # The queue goes whatever happened: on the measuring connection,
            # which has its place on a full server, or on one of its own if
            # that one broke.
            try:
                client.call(b"DEL", queue)
            except BeussError:
                with Client(client.host, client.port,
                            client.timeout) as cleaner:
                    try:
                        cleaner.call(b"DEL", queue)
                    except BeussError:
                        pass
    return EXIT_OK


def _bench_load(client, address, name, request, line_ends, options):
    # Each connection owns a share of the requests and keeps `pipeline` of
    # them in flight; a reply is complete when its line ends have come.
    # Returns the seconds it all took and the seconds each round trip took.
    shares = [options.messages // options.clients] * options.clients
    for i in range(options.messages % options.clients):
        shares[i] += 1
    selector = selectors.DefaultSelector()
    socks, latencies = [], []
    progress = sys.stderr.isatty()
    try:
        for share in shares:
            if not share:
                continue
            sock = socket.create_connection(
                (_host_bytes(address[0]), address[1]), client.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(sock)
            selector.register(sock, selectors.EVENT_READ,
                              {"left": share, "due": 0, "sent": 0})
        started = time.perf_counter()
        for key in selector.get_map().values():
            _bench_send(key.fileobj, key.data, request, line_ends, options)
        done, shown = 0, -1
        while selector.get_map():
            for key, _ in selector.select(client.timeout) or _timed_out():
                state = key.data
                data = key.fileobj.recv(READ_SIZE)
                if data[:1] == b"-" or b"\r\n-" in data:
                    error = data[data.index(b"-"):].split(b"\r\n")[0]
                    raise ReplyError(error[1:].decode("utf-8", "replace"))
                if not data:
                    raise ConnectionFailed("the server closed a connection")
                state["due"] -= data.count(b"\r\n")
                if state["due"] <= 0:
                    latencies.append(time.perf_counter() - state["sent"])
                    done += state["batch"]
                    if state["left"]:
                        _bench_send(key.fileobj, state, request, line_ends,
                                    options)
                    else:
                        selector.unregister(key.fileobj)
            if progress and done * 10 // options.messages != shown:
                shown = done * 10 // options.messages
                sys.stderr.write("\r%s %d%%" % (name, min(shown * 10, 100)))
                sys.stderr.flush()
        if progress:
            sys.stderr.write("\r" + " " * (len(name) + 5) + "\r")
        return time.perf_counter() - started, latencies
    except OSError as exc:
        raise ConnectionFailed("lost the server at %s:%d: %s"
                               % (address[0], address[1], _reason(exc)))
    finally:
        selector.close()
        for sock in socks:
            _finish_load(sock)


def _finish_load(sock):
    """Close a load connection once the server has run all it sent: it
    closes its side when it reads the end. So the cleanup's DEL, on
    another connection, comes after the last RPUSH even when the load
    stopped half way."""
    try:
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(READ_SIZE):
            pass
    except OSError:
        pass
    sock.close()


def _bench_send(sock, state, request, line_ends, options):
    count = min(options.pipeline, state["left"])
    state["left"] -= count
    state["batch"], state["due"] = count, count * line_ends
    state["sent"] = time.perf_counter()
    sock.sendall(request * count)


def _timed_out():
    raise ConnectionFailed("the server stopped answering")


# A verb: how it runs, its options, its arguments and what it does (the
# first sentence of its --help, and its lines in the general --help).
VERBS = {
    "SERVE": (run_serve, _serve_arguments, "", "Serve the queues (the verb "
              "when none is given)."),
    "PUT": (run_put, _put_arguments, " <queue> [msg]", "Put msg, or all of "
            "stdin, on a queue as one message."),
    "GET": (run_get, _get_arguments, " <queue> [file]", "Take one message "
            "from a queue; write it to file, or to stdout."),
    "ON": (run_on, _on_arguments, " <queue>", "Take the messages of a queue "
           "as they come, writing each to stdout, a line each (-s '' for the "
           "bytes alone), for ever unless --count or --timeout says "
           "otherwise."),
    "PEEK": (run_peek, _peek_arguments, " <queue> [N]", "Print the first N "
             "messages (1) of a queue without taking them; with --why, why "
             "the messages of <queue>.dead died."),
    "REDRIVE": (run_redrive, _redrive_arguments, " <queue> [N]", "Move the "
                "dead letters of a queue back to it as new messages; print "
                "how many."),
    "PAUSE": (run_pause, _pause_arguments, " <queue>...", "Stop delivering "
              "from queues: they still take messages, consumers wait."),
    "RESUME": (lambda options: run_pause(options, False), _pause_arguments,
               " <queue>...", "Deliver from paused queues again."),
    "QUEUE": (run_queue, _queue_settings_arguments,
              " <queue> [setting value]...", "Show a queue's own settings, "
              "changing those given first: max-length, max-bytes, overflow "
              "(reject, drop-oldest, drop-newest), ttl, rate (10/s) and "
              "dedup-window (of PUT --id)."),
    "DEL": (run_del, _del_arguments, " <queue>...", "Delete queues and "
            "their messages; print how many there were."),
    "LEN": (run_len, _queue_argument, " <queue>", "Print how many messages "
            "a queue holds."),
    "LIST": (run_list, _add_address, "", "Print each queue that holds "
             "messages, with its length."),
    "PUB": (run_pub, _pub_arguments, " <channel> [msg]", "Publish msg, or "
            "all of stdin, to the subscribers of a channel now; nothing "
            "keeps it for later."),
    "SUB": (run_sub, _sub_arguments, " <channel>...", "Print the messages "
            "published on channels (a name with * ? or [ is a pattern) as "
            "they come, for ever unless --count or --timeout says "
            "otherwise."),
    "PING": (run_ping, _add_address, "", "Check that the server answers."),
    "STATS": (run_stats, _add_address, "", "Print a summary of the "
              "server's state."),
    "TOP": (run_top, _top_arguments, "", "Show the queues live: counts, "
            "rates and depth (Ctrl-C or q ends it); one snapshot when stdout "
            "is not a terminal."),
    "BENCH": (run_bench, _bench_arguments, "", "Measure the server: put, "
              "then take, many messages."),
}


if __name__ == "__main__":
    sys.exit(main())
