"""What every engine connector shares: the scheduler-side request tracking over the leader's index
(`leader.ConnectorLeader`), the worker-side execution of step plans (`worker.ConnectorWorker`), the messages
between them (`messages`) and the process's metrics (`process_metrics`). The engine packages only adapt calls."""
