"""Long-running jobs (quantization, fine-tuning, export) in child processes; no gRPC here."""

from inferd.engines.jobs.child import JobChannel, JobFailed, JobStopped
from inferd.engines.jobs.job import COMPLETED, FAILED, QUEUED, STOPPED, TERMINAL, Job
from inferd.engines.jobs.runner import JobRunner, new_job_id, tail

__all__ = ["COMPLETED", "FAILED", "QUEUED", "STOPPED", "TERMINAL", "Job", "JobChannel", "JobFailed",
           "JobRunner", "JobStopped", "new_job_id", "tail"]
