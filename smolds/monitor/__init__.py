"""Monitoring: what the routers did and how training went.

    stats.py              routing statistics (MaxVio, CV, entropy, EP imbalance): each computed here only
    live.py               the routing monitor the trainer calls every step (rows, warnings, images)
    run_report.py         `smolds monitor RUN_DIR`: the report from a run's metrics.jsonl
    checkpoint_report.py  `smolds monitor CKPT --data`: a checkpoint's routing over evaluation text
    plots.py              the figures and the Markdown report they go into
    curves.py             training curves (`smolds curves`, OUT_DIR/curves.png)
    cli.py                the `smolds monitor` command
"""
