"""Plots bench/autoscale.sh's replay: offered load, backlog, replicas and
queue wait over time, from the controller's CSV and the ledger's waits.

    python bench/plot_autoscale.py CSV WAITS PNG
"""

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

rows_csv, waits_file, png = sys.argv[1], sys.argv[2], sys.argv[3]
with open(rows_csv) as f:
    rows = list(csv.DictReader(f))
t = [float(r["t_s"]) for r in rows]
start_ms = int(rows[0]["t_unix_ms"]) - int(float(rows[0]["t_s"]) * 1000)
waits_t, waits_p50, waits_p99 = [], [], []
with open(waits_file) as f:
    for line in f:
        second_ms, p50, p99 = line.split()
        waits_t.append((int(float(second_ms)) - start_ms) / 1000)
        waits_p50.append(float(p50))
        waits_p99.append(float(p99))

fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
axes[0].plot(t, [float(r["offered_per_s"]) for r in rows], color="tab:blue")
axes[0].set_ylabel("offered jobs/s")
axes[1].plot(t, [float(r["backlog"]) for r in rows], color="tab:orange")
axes[1].set_ylabel("backlog (jobs)")
axes[2].step(t, [int(r["replicas"]) for r in rows], where="post", color="tab:green", label="replicas")
axes[2].step(t, [int(r["desired"]) for r in rows], where="post", color="tab:gray", linestyle=":", label="ceil(backlog / target)")
axes[2].set_ylabel("worker replicas")
axes[2].legend(loc="upper right")
axes[3].plot(waits_t, waits_p50, color="tab:red", label="p50")
axes[3].plot(waits_t, waits_p99, color="tab:purple", label="p99")
axes[3].set_ylabel("queue wait (s)")
axes[3].set_xlabel("time (s)")
axes[3].legend(loc="upper right")
for ax in axes:
    ax.grid(alpha=0.3)
fig.suptitle("Sluice autoscaling replay: a 10× spike through the ingress, workers scaled on the scaler's backlog")
fig.tight_layout()
fig.savefig(png, dpi=100)
print(f"plot: {png}")
