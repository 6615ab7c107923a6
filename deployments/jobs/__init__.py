"""Jobs: records in object storage, their lifecycle, limits, billing and webhooks (no FastAPI, no
tensors). The ingress is stateless: any replica answers any poll.

A record is only ever written over the version its writer last read or wrote (a compare-and-swap on
the object's ETag, `store.JobStore.save`), so a job has one runner at a time: a reaper claims an
abandoned job by renewing its lease over the version it judged expired, and a runner whose record
changed under it (another runner took the job over) learns so at its next write (`Superseded`) and
stops. `records` documents every object key.
"""
