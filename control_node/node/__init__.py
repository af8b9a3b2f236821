"""The control node, by job (``ddpg serve`` runs it; ``control_node.admin`` is its admin client).

- ``loop.py``: ``ControlNode``: start-up checks, the fixed-rate loop (run -> wait -> drain ->
  tick) and stopping; it owns the sockets and composes the parts below.
- ``clock.py``: how the loop waits for a deadline (sleep in ``select``, then spin) and the phase
  lock that moves ticks to just after a lead realtime bridge's observations (``PhaseLock``).
- ``sessions.py``: bridge messages: hello, per-message checks, transition labelling, episode
  accounts, the hand-off to the transition log, the watchdog.
- ``serving.py``: batched inference, safety (clip, safe action for non-finite), the shadow
  model, sending the actions.
- ``deploy.py``: the admin socket's server side: status, shutdown, deploy (its loader thread)
  and rollback.
- ``status.py``: the status map and its one-line summary.
- ``bridges.py``: what the node knows of each bridge and the socket to them (used by sessions
  and serving alike).
- ``stats.py``: the duration histograms behind the latency figures.
"""
