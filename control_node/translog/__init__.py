"""The transition log: every transition the control node serves, as crash-safe Parquet chunks.

A log is a directory of chunks, each a complete Parquet file that carries the robot's spec in its
schema metadata, so pandas or any Parquet reader reads it without this package. One job a module
(after the Python MCAP library's split):

- :mod:`~control_node.translog.schema`: the layout: schema versions, file names, :class:`LogSpec`
  (what every row shares), :class:`Transition` (one row), ``LogError``.
- :mod:`~control_node.translog.writer`: :class:`TransitionLog`, the node's append-only writer: a
  deque append on the hot path, a thread that converts and writes chunks (temp file, fsync,
  rename), so a crash loses at most the open chunk.
- :mod:`~control_node.translog.reader`: :func:`read_logs` and the numpy views of its columns;
  :func:`read_pixel_segments` rebuilds a pixel log's stacked observations.
- :mod:`~control_node.translog.summary`: :func:`summarize`, what ``ddpg logs`` prints.

``docs/transition_log.md`` describes the files and columns.
"""
