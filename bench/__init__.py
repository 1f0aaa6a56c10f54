"""swapnbd's benchmark: nbd-serve side by side with nbdkit, qemu-nbd and nbd-server.

``python -m bench`` (or ``bench/run``) exports one file on /dev/shm from every server,
drives each with fio's nbd engine over loopback in interleaved rounds, and writes a
Markdown table and a JSON document under ``bench/results/``. ``python -m bench.profile``
records nbd-serve with py-spy under one workload.

Modules: ``workloads`` (fio jobs, fio JSON), ``servers`` (launchers), ``monitor`` (CPU and
RSS), ``report`` (medians, ratios, tables), ``runner`` (the run), ``profile`` (py-spy).
"""
