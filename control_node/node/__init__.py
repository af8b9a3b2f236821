"""The control node, by job (``ddpg serve`` runs it; ``control_node.admin`` is its admin client).

- ``loop.py``: ``ControlNode``: start-up checks, the fixed-rate loop (run -> wait -> drain ->
  tick, the drain bounded by the next deadline) and stopping; it owns the sockets (bounded
  queues and frame sizes) and composes the parts below.
- ``clock.py``: how the loop waits for a deadline (sleep in ``select``, then spin) and the phase
  lock that moves ticks to just after a lead realtime bridge's observations (``PhaseLock``).
- ``sessions.py``: bridge messages: each bridge's rate limit, hello, per-message checks,
  transition labelling, episode accounts, the hand-off to the transition log, the watchdog,
  the bounded bridge table (max live, retention).
- ``serving.py``: batched inference, safety (clip, safe action for non-finite), the shadow
  model, sending the actions.
- ``deploy.py``: the admin socket's server side: typed requests, the token for changing ones,
  status, shutdown, deploy (its loader thread, bounded in size, time and measured cost) and
  rollback.
- ``status.py``: the status map and its one-line summary.
- ``bridges.py``: what the node knows of each bridge and the socket to them (used by sessions
  and serving alike).
- ``stats.py``: the duration histograms behind the latency figures.
"""
