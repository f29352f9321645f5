"""``depth-engine``: a thin edge over the Python API. Exit 0 on success, 2 on a usage or
configuration error (one line, no traceback), 3 when shards failed permanently."""
from __future__ import annotations

import logging
import os
import sys

from engine.cli.commands import COMMANDS
from engine.cli.parser import UsageError, build_parser
from engine.config import ConfigError
from engine.errors import JobAborted
from storage.objectstore import StorageError


def main(argv: list[str] | None = None, *, _program: bool = False) -> int:
    if argv is None:
        # Run as the program (`python -m engine`, the `depth-engine` script): leave without
        # interpreter teardown. An Arrow pool thread can still be dropping the last reference to
        # a numpy-backed buffer (the audit's Acero group_by) when Python finalizes; the buffer's
        # destructor takes the GIL, CPython then ends that thread with pthread_exit, and the unwind
        # through a noexcept destructor is std::terminate: exit 134 after complete output. So: do
        # here what teardown would do that matters (Ray is shut down by the commands that start it;
        # an attached driver is disconnected here), flush, and _exit. A caller passing argv returns.
        code = main(sys.argv[1:], _program=True)
        try:
            if "ray" in sys.modules and sys.modules["ray"].is_initialized():
                sys.modules["ray"].shutdown()
        except Exception:  # noqa: BLE001 - the cluster notices a driver that is gone
            pass
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):  # a closed pipe: Python's own exit says 120 then
                code = code or 120
        os._exit(code)
    # Library chatter (weight-loading bars, backend notices) would bury the progress bar;
    # set before transformers is imported, and inherited by local Ray workers.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # A hub repo with only pickle weights is refused, not converted behind the user's back.
    os.environ.setdefault("DISABLE_SAFETENSORS_CONVERSION", "1")
    logging.basicConfig(level=os.environ.get("DEPTH_ENGINE_LOG", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    _redact_every_message(argv)
    args = None
    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "json", False):
            from engine.cli.printing import json_stdout

            # run as the program, stdout stays stderr until the exit: an attached Ray is
            # disconnected after the command, and may still print then
            with json_stdout(restore=not _program):
                return COMMANDS[args.command](args)
        return COMMANDS[args.command](args)
    # Every message is redacted: a URL or a server may echo credentials (storage.objectstore.redact).
    except UsageError as e:
        return _fail(args, str(e), 2)
    except ConfigError as e:
        return _fail(args, f"depth-engine: {e}", 2)
    except StorageError as e:   # a full disk too: OSError is a StorageError where storage wraps it
        return _fail(args, f"depth-engine: storage: {e}", 2)
    except JobAborted as e:
        return _fail(args, f"depth-engine: stopped: {e}. Committed shards are kept; run the same command again "
                           "to resume.", 1)
    except KeyboardInterrupt:
        return _fail(args, "depth-engine: interrupted; committed shards are kept. Run the same command again to "
                           "resume.", 130)
    except Exception:  # a bug: its traceback as Python would print it, with credentials blanked
        import traceback

        return _fail(args, traceback.format_exc().rstrip(), 1)


def _fail(args, text: str, code: int) -> int:
    """Print why the command ends (redacted) and return its exit code; a ``--json`` command
    also prints one JSON object, so a script reading stdout always gets one."""
    from storage.objectstore import redact

    text = redact(text)
    print(text, file=sys.stderr)
    if getattr(args, "json", False):
        from engine.cli.printing import print_json

        print_json({"error": text.splitlines()[-1] if text else "", "exit_code": code})
    return code

class _Redacting(logging.Filter):
    """A log record's text with credentials blanked, whichever library logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        from storage.objectstore import redact

        try:
            record.msg, record.args = redact(record.getMessage()), None
        except Exception:  # noqa: BLE001 - a malformed record: logging reports it as it would
            return True
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def _redact_every_message(argv: list[str]) -> None:
    """One redaction for every message this process prints: credentials in the arguments are
    remembered (a library may quote them without their URL), and log records and warnings
    pass through redact() like the CLI's own lines."""
    from storage.objectstore import remember_credentials

    remember_credentials(argv)
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _Redacting) for f in handler.filters):
            handler.addFilter(_Redacting())


if __name__ == "__main__":
    sys.exit(main())
