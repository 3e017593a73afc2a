"""Talking to MongoDB: the connection flags, the password, connecting, and one-line errors. Shared by
get_data_by_labels.py (reads) and predict.py (reads and writes back).

    add_connection_args(parser)                 # --host --port --uri -u --auth-database --timeout -d -c
    problems += connection_problems(args)        # a password in --uri, --uri with --host, bad --timeout
    client = connect(args, read_password(args), appname="predict")
    try: ...
    except PyMongoError as e: raise mongo_error(e, args, may="read and write") from None

The password comes from MONGO_PASSWORD or an interactive prompt, never from the command line; URIs are
redacted in every message.
"""
from __future__ import annotations

import getpass
import math
import os
import re
import warnings

from .common import UserError, redact

SOCKET_TIMEOUT_S = 300   # a query may scan a large unindexed collection before its first batch
MAX_TIMEOUT_S = 86_400   # --timeout: a day; pymongo needs a finite number of milliseconds


def add_connection_args(p, db: str = "scanadata", collection: str = "data_items"):
    """The connection and collection flags (one argument group each); returns the collection group."""
    g = p.add_argument_group("connection")
    g.add_argument("--host", default=None, help="MongoDB host (default: localhost)")
    g.add_argument("--port", type=int, default=None, help="MongoDB port (default: 27017)")
    g.add_argument("--uri", default=None,
                   help="connection string instead of --host/--port, e.g. mongodb://h1,h2/?replicaSet=rs0; "
                        "no credentials in it: use -u and MONGO_PASSWORD")
    g.add_argument("-u", "--username", default=None, help="user name; the password is read from MONGO_PASSWORD "
                                                          "or prompted for")
    g.add_argument("--auth-database", default=None, help="database the user is defined in (default: admin)")
    g.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server to answer (default: 5)")
    g = p.add_argument_group("source")
    g.add_argument("-d", "--db", "--database", dest="db", default=db, help=f"database (default: {db})")
    g.add_argument("-c", "--collection", default=collection, help=f"collection (default: {collection})")
    return g


def connection_problems(args) -> list[str]:
    problems = []
    if args.uri and (args.host or args.port):
        problems.append("give either --uri or --host/--port, not both")
    # a host has no "@": one anywhere before the query means user:password@ (the password may hold "/")
    if args.uri and re.match(r"^[a-z][a-z0-9+.-]*:/+[^?#]*@", args.uri, re.I):
        problems.append("--uri must not carry credentials: put the user in -u/--username and the password in "
                        "the environment variable MONGO_PASSWORD")
    if args.host and ("://" in args.host or "@" in args.host):  # pymongo takes a whole URI here, credentials too
        problems.append("--host takes a host name or address (e.g. db.internal), not a connection string or "
                        "user:password@host: a connection string goes in --uri, the user in -u/--username and "
                        "the password in MONGO_PASSWORD")
    if args.port is not None and not 1 <= args.port <= 65535:
        problems.append(f"--port must be between 1 and 65535, got {args.port}")
    if not (math.isfinite(args.timeout) and 0 < args.timeout <= MAX_TIMEOUT_S):
        problems.append(f"--timeout must be a number of seconds > 0 and at most {MAX_TIMEOUT_S:,}, got {args.timeout}")
    for flag, value in (("--db", args.db), ("-c/--collection", args.collection),
                        ("--auth-database", args.auth_database)):
        if value is not None and not value.strip():
            problems.append(f"{flag} must not be empty")
    return problems


def read_password(args) -> str | None:
    if not args.username:
        return None
    password = os.environ.get("MONGO_PASSWORD")
    if password:
        return password
    try:
        return getpass.getpass(f"MongoDB password for {args.username}: ")
    except EOFError:
        raise UserError(f"no password for user '{args.username}': set the environment variable MONGO_PASSWORD "
                        "or run in a terminal to be prompted") from None


def server_name(args) -> str:
    return redact(args.uri if args.uri else f"{args.host or 'localhost'}:{args.port or 27017}")


def connect(args, password, appname: str):
    from pymongo import MongoClient

    ms = int(args.timeout * 1000)
    kw = dict(serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=SOCKET_TIMEOUT_S * 1000,
              appname=appname)
    if args.username:
        kw.update(username=args.username, password=password)
        if args.auth_database:
            kw["authSource"] = args.auth_database
    try:
        with warnings.catch_warnings():  # pymongo only warns about an unknown or invalid --uri option, and drops it
            warnings.simplefilter("error", UserWarning)
            if args.uri:
                return MongoClient(args.uri, **kw)
            return MongoClient(args.host or "localhost", args.port or 27017, **kw)
    except (ValueError, TypeError, OSError, UserWarning) as e:  # option checks that are not PyMongoErrors
        raise UserError(f"cannot use the connection settings for {server_name(args)} ({redact(str(e))}); check "
                        "--uri (or --host/--port)") from None


def mongo_error(e: Exception, args, may: str = "read", lost: str = "nothing was written") -> UserError:
    """One line for each way talking to the server can fail. Never echoes a password (URIs are redacted).
    `may`: what the user must be allowed to do on the database; `lost`: what a dropped connection leaves."""
    from pymongo.errors import AutoReconnect, OperationFailure, ServerSelectionTimeoutError

    text = re.sub(r" \(configured timeouts:[^)]*\)", "", " ".join(redact(str(e)).split()))
    where = server_name(args)
    if isinstance(e, ServerSelectionTimeoutError):
        m = re.search(r"^\S+: (.*?), Timeout:", text)
        reason = m.group(1) if m else text.split(", Timeout:")[0][:200]
        return UserError(f"cannot reach MongoDB at {where} within {args.timeout:g} s ({reason}); check "
                         "--host/--port (or --uri) and that the server is running")
    if isinstance(e, OperationFailure):
        message = text.split(", full error:")[0]
        if e.code == 18:
            return UserError(f"authentication failed for user '{args.username}' on database "
                             f"'{args.auth_database or 'admin'}'; check -u/--username, --auth-database and "
                             "MONGO_PASSWORD")
        if e.code == 13:
            hint = ("the server requires a login: give -u/--username" if not args.username else
                    f"check that user '{args.username}' may {may} database '{args.db}'")
            return UserError(f"not authorized ({message}); {hint}")
        return UserError(f"MongoDB refused the query on {args.db}.{args.collection}: {message}")
    if isinstance(e, AutoReconnect):
        return UserError(f"lost the connection to MongoDB at {where} ({text[:200]}); {lost}")
    return UserError(f"MongoDB error at {where}: {text[:300]}")


def open_collection(client, args, need_fields: list[tuple[str, str]]):
    """The collection, after checking it and the fields exist; errors say which and where."""
    client.admin.command("ping")  # server selection and authentication happen here
    db = client[args.db]
    names = db.list_collection_names()
    if args.collection not in names:
        have = (f"it has: {', '.join(sorted(names)[:20])}" if names else
                "the database is empty or does not exist")
        raise UserError(f"collection '{args.collection}' not found in database '{args.db}' ({have}); "
                        "check --db/--collection")
    coll = db[args.collection]
    missing = []
    for name, flag in need_fields:
        # stops at the first document that has it; a full scan only when the field is missing everywhere
        if coll.find_one({name: {"$exists": True}}, {"_id": 1}) is None:
            missing.append(f"'{name}' ({flag})")
    if missing:
        raise UserError(f"no document in {args.db}.{args.collection} has the field(s) {', '.join(missing)}")
    return coll


def get_path(doc: dict, path: str):
    """The value at a dotted path; through a list, the values of its sub-documents (None if absent)."""
    value = doc
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list):
            value = [v.get(part) for v in value if isinstance(v, dict)]
        else:
            return None
    return value
