"""What stops a run before it changes anything. Before it writes anything: is the API there,
at this base URL, with this key, and do the projects and regions the job names exist
(``check_names``)? After its plan, before any PATCH: did each selector match something where the
job requires it, and is the plan within the job's safety limits (``check_limits``)?

``check`` reads ``GET /cloud/v1/regions`` once (``api.Client.probe``: a short budget, no
retry), so a wrong base URL, a host that does not answer or a refused key end the command in
seconds, naming the cause, with no run folder made: exit 2 (``JobError``: 404, a redirect,
not the API's JSON, a host name that does not exist, a TLS failure), 75 (``Unreachable``:
refused, timed out), 4 (``AuthFailed``). Then the projects list (and the regions list, where
the probe could not read it) is read once, with the run's retries, and a project or region a
query names that the lists do not hold is a ``JobError`` naming each one. The lists come back
as ``selectors.Known``, which expands ``all`` without reading them again.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

from worker import api, retry, spec
from worker.errors import ApiError, AuthFailed, JobError, SafetyLimit, Unreachable
from worker.log import get_logger
from worker.selectors import Known, listed_ids

log = get_logger("bulk_tagger.run")


async def check_names(
    client: api.Client, job: spec.Job | None, policy: retry.RetryPolicy,
    on_retry: Callable[[BaseException, float], None],
) -> Known:
    """The probe, then (for a job) the projects and regions its queries name, read with the
    run's retries. Raises what ends the command (see the module)."""

    try:
        regions = await client.probe()
        known = Known(regions=None if regions is None else listed_ids(regions, "regions"))
        if job is not None:
            known = await _check_named(job, client, retry.Reader(policy, on_retry), known)
    except AuthFailed as exc:
        log.error("run.auth_failed", status=exc.status, error=exc.message)
        raise AuthFailed(
            f"the API refused the credentials (HTTP {exc.status}): {exc.message}",
            status=exc.status,
        ) from None
    except ApiError as exc:  # no answer, or one retried past the budget
        log.error("run.api_unreachable", status=exc.status, error=exc.message,
                  cause=getattr(exc, "cause", None))
        raise Unreachable(
            f"the API at {client.base_url} cannot be reached: {exc.message}"
        ) from None
    return known


async def _check_named(
    job: spec.Job,
    client: api.Client,
    read: retry.Reader,
    known: Known,
) -> Known:
    """The projects and regions lists the job's queries need, each read once (``known`` may
    hold the regions already: the probe reads them). A project or region a query names that
    the lists do not hold is a ``JobError`` naming every one (nothing is sent).
    """
    queries = [(n, t.query) for n, t in enumerate(job.targets) if isinstance(t, spec.QuerySelector)]
    if not queries:
        return known
    if known.projects is None:
        known.projects = listed_ids(await read(client.list_projects), "projects")
    if known.regions is None:
        known.regions = listed_ids(await read(client.list_regions), "regions")
    problems = []
    for n, query in queries:
        for kind, listed in (("projects", known.projects), ("regions", known.regions)):
            named = getattr(query, kind)
            if isinstance(named, str):
                continue
            missing = [i for i in named if i not in set(listed)]
            if missing:
                what = kind[:-1] if len(missing) == 1 else kind
                problems.append(
                    f"targets[{n}].query.{kind}: {what} {', '.join(map(str, missing))} "
                    f"not found (the API lists {len(listed)} {kind})"
                )
    if problems:
        env = f"{spec.PROJECT_ENV} or {spec.REGION_ENV}"
        raise JobError(
            "; ".join(problems), file=str(job.path),
            hint=f"a typo? an ID from the API's lists, or {env} where the query names none;"
            " nothing was sent",
        )
    return known


def check_limits(
    matched: Mapping[str, int] | None, planned: int, total: int, *, require_matches: bool,
    max_changes: int | None, max_changes_percent: float | None, elsewhere: Collection[str] = (),
) -> None:
    """After the plan, before any PATCH: ``SafetyLimit`` (exit 3) where a selector matched no
    image under ``require_matches`` (``matched``: images per selector, None where this
    process did not plan; ``elsewhere``: selectors whose images all fell to other shards, a
    match all the same), or the plan changes more images (``planned`` of ``total``) than
    ``max_changes`` / ``max_changes_percent`` allow."""
    empty = [label for label, n in (matched or {}).items() if n == 0 and label not in elsewhere]
    if require_matches and empty:
        raise SafetyLimit(
            f"{', '.join(empty)} matched no image, and require_matches is set: nothing was sent"
        )
    if max_changes is not None and planned > max_changes:
        raise SafetyLimit(
            f"the plan changes {planned} images, over max_changes {max_changes}: nothing was sent"
        )
    if max_changes_percent is not None and total and planned * 100 / total > max_changes_percent:
        raise SafetyLimit(
            f"the plan changes {planned} of {total} matched images "
            f"({planned * 100 / total:.1f}%), over max_changes_percent "
            f"{max_changes_percent:g}: nothing was sent"
        )
