"""A Celery worker running blockfilter's tasks: what it checks when it starts, how it shouts.

Connected when :mod:`blockfilter.tasks` is imported (which registering the tasks does), for
every worker whose app has the tasks:

* **Log guard.** Records of the library's loggers, Celery's among them, have their numbers
  masked and secrets removed from the moment the tasks are imported, in the worker's main
  process as in its pool processes (:func:`blockfilter.redact.guard_library_logs`); the
  worker's API key and cache secret are registered as secrets when it starts.
* **Startup check.** A worker that could check nothing must not start "ready": it reads its
  settings (the environment and its app's ``conf``), requires the credentials and builds the
  plugin manager (so a broken plugin in strict mode, or no blocklist source, stops it too).
  On failure it logs one CRITICAL line and exits with status 78 (``EX_CONFIG``).
  ``BLOCKFILTER_STARTUP_CHECK=api`` also makes one request (a blocklist page of one entry) so
  refused credentials stop the worker as well; ``off`` skips the check.
* **Refusals.** :func:`report_refusal` is the ERROR line a task logs when Kaleyra refused the
  credentials or the account: the code, what to fix, where the setting came from; never the
  key.
* **Metrics.** With ``BLOCKFILTER_METRICS_PORT`` set, the worker serves its Prometheus metrics
  there, its pool processes' added up (:func:`blockfilter.metrics.serve_worker_metrics`); a
  port that cannot be served refuses the start like a bad setting.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Final

from celery.signals import (
    celeryd_after_setup,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)

from .. import metrics
from ..config import Settings, load_settings
from ..errors import ConfigError, CredentialsRefused, UpstreamError
from ..redact import guard_library_logs

log = logging.getLogger("blockfilter.worker")

#: The exit status of a worker that refused to start (sysexits' EX_CONFIG).
EXIT_CONFIG: Final = getattr(os, "EX_CONFIG", 78)

# What to do about each refusal code (the contract's list).
_FIXES = {
    "RBC001": "the SID or the API key is wrong: fix KALEYRA_SID / KALEYRA_API_KEY",
    "WA401": "the account is not allowed this: check its permissions with Kaleyra",
    "WA-401": "the account is not allowed this: check its permissions with Kaleyra",
    "E110": "the account's balance is too low: top it up",
}
_DEFAULT_FIX = "check KALEYRA_SID, KALEYRA_API_KEY and KALEYRA_BASE_URL"

# The registered task whose presence means "this app runs blockfilter" (not imported from
# .tasks: that module imports this one).
_FILTER_TASK = "blockfilter.filter_messages"


class StartupRefused(SystemExit):
    """The worker refuses to start; the message says why and what to set."""

    def __init__(self, why: str) -> None:
        super().__init__(EXIT_CONFIG)
        self.why = why


def describe_refusal(error: CredentialsRefused, settings: Settings | None = None) -> str:
    """One sentence: which refusal, what to fix, where the credentials came from."""
    code = error.code or "no code"
    http = f"HTTP {error.status}" if error.status else "no HTTP status"
    fix = _FIXES.get(error.code or "", _DEFAULT_FIX)
    where = ""
    if settings is not None:
        origins = [
            f"{variable} from {settings.sources.get(name, 'default')}"
            for name, variable in (("sid", "KALEYRA_SID"), ("api_key", "KALEYRA_API_KEY"))
        ]
        where = f" ({', '.join(origins)})"
    return f"Kaleyra refused the credentials or the account ({code}, {http}): {fix}{where}"


def report_refusal(
    error: CredentialsRefused, settings: Settings | None, *, messages: int, task: str
) -> None:
    """The ERROR line of a task whose check was refused; the messages were parked."""
    log.error(
        "%s: %s; %d message(s) parked as credentials_refused, replay them with "
        "`blockfilter replay` once fixed",
        task,
        describe_refusal(error, settings),
        messages,
    )


# -- the startup check -----------------------------------------------------------------------


def _startup_check_setting(conf: Any) -> str:
    raw = conf.get("blockfilter_startup_check") if conf is not None else None
    if raw is None:
        raw = os.environ.get("BLOCKFILTER_STARTUP_CHECK", "")
    return str(raw).strip().lower()


def check_worker_settings(conf: Any) -> Settings | None:
    """What a starting worker checks (see the module documentation).

    :return: the settings, or ``None`` when the check is off.
    :raises StartupRefused: the worker must not start.
    """
    try:
        settings = load_settings(celery_conf=conf)
    except ConfigError as exc:
        if _startup_check_setting(conf) == "off":
            return None
        raise StartupRefused(str(exc)) from None
    guard_library_logs(settings.api_key, settings.cache_secret)
    if settings.startup_check == "off":
        return None
    from ..plugins.manager import make_plugin_manager  # late: plugins import much of the library

    try:
        settings.require_credentials()
        make_plugin_manager(settings)
    except ConfigError as exc:
        raise StartupRefused(str(exc)) from None
    if settings.startup_check == "api":
        _check_the_api(settings)
    return settings


def _check_the_api(settings: Settings) -> None:
    """One request, a blocklist page of one entry: are the credentials accepted?"""
    from ..kaleyra.client import KaleyraClient

    with KaleyraClient(settings.replace(retry_attempts=1)) as client:
        try:
            client.blocklist_page("sms", 0, page_size=1)
        except CredentialsRefused as exc:
            raise StartupRefused(describe_refusal(exc, settings)) from None
        except UpstreamError as exc:
            # Not a reason to stay down: the tasks defer (fail closed) until the API answers.
            log.warning(
                "BLOCKFILTER_STARTUP_CHECK=api: Kaleyra could not be asked (%s); starting "
                "anyway, checks are deferred until it answers",
                exc,
            )
            return
    log.info("BLOCKFILTER_STARTUP_CHECK=api: Kaleyra accepted the credentials")


def _refuse(why: str) -> None:
    """Log the one CRITICAL line, on stderr even before Celery set up its logging."""
    message = (
        f"blockfilter: this worker refuses to start: {why} "
        "(set BLOCKFILTER_STARTUP_CHECK=off to start without the check)"
    )
    root = logging.getLogger()
    if root.handlers or log.handlers:
        log.critical(message)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        log.addHandler(handler)
        try:
            log.critical(message)
        finally:
            log.removeHandler(handler)


def _start_checked(app: Any) -> None:
    if app is None or _FILTER_TASK not in app.tasks:
        return
    guard_library_logs()
    try:
        settings = check_worker_settings(app.conf)
        if settings is None:  # the check is off; the metrics port is still wanted
            try:
                settings = load_settings(celery_conf=app.conf)
            except ConfigError:
                settings = None
        if settings is not None and settings.metrics_port:
            try:
                metrics.serve_worker_metrics(settings.metrics_port)
            except (ConfigError, OSError) as exc:
                raise StartupRefused(f"BLOCKFILTER_METRICS_PORT: {exc}") from None
    except StartupRefused as refused:
        _refuse(refused.why)
        raise


@worker_init.connect(weak=False, dispatch_uid="blockfilter.worker_init")
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    from celery.apps.worker import Worker

    if isinstance(sender, Worker):
        return  # `celery worker`: checked once its logging is set up (below)
    _start_checked(getattr(sender, "app", None))  # an embedded worker (start_worker, demo)


@celeryd_after_setup.connect(weak=False, dispatch_uid="blockfilter.celeryd_after_setup")
def _on_worker_setup(sender: Any = None, instance: Any = None, **_: Any) -> None:
    # Sent before the pool and the consumer start: a refusal here stops the worker cleanly
    # (Celery's WorkController.start turns the SystemExit into its exit code).
    _start_checked(getattr(instance, "app", None))


@worker_process_init.connect(weak=False, dispatch_uid="blockfilter.worker_process_init")
def _on_pool_process_init(**_: Any) -> None:
    # A pool process inherits the guard when forked; one started otherwise gets it here.
    guard_library_logs()


@worker_process_shutdown.connect(weak=False, dispatch_uid="blockfilter.worker_process_shutdown")
def _on_pool_process_shutdown(pid: Any = None, **_: Any) -> None:
    metrics.forget_process(int(pid) if pid else os.getpid())
