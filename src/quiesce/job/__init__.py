"""Layer job: the job schema and its validation, building quiescers, running the phases,
the report and the run's metrics.

A job built in Python gets the same checks as a job file::

    from quiesce.job import JobConfig, job_from_config, run_job

    config = JobConfig.model_validate({"volumes": ["/srv/db"], "provider": {"type": "btrfs"}})
    report = run_job(job_from_config(config))
    print(report.consistency, report.window_s)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from quiesce.util.lazy import lazy_exports

if TYPE_CHECKING:
    from quiesce.job.report import Phase, Report
    from quiesce.job.run import run_job
    from quiesce.job.schema import Job, JobConfig, JobConfigError, Problem
    from quiesce.job.validate import job_from_config, load_job

__getattr__ = lazy_exports(
    __name__,
    {
        "Job": ".schema:Job",
        "JobConfig": ".schema:JobConfig",
        "JobConfigError": "quiesce.errors:JobConfigError",
        "Phase": ".report:Phase",
        "Problem": ".schema:Problem",
        "Report": ".report:Report",
        "job_from_config": ".validate:job_from_config",
        "load_job": ".validate:load_job",
        "run_job": ".run:run_job",
    },
)

__all__ = [
    "Job",
    "JobConfig",
    "JobConfigError",
    "Phase",
    "Problem",
    "Report",
    "job_from_config",
    "load_job",
    "run_job",
]
