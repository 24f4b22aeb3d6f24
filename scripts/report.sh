#!/usr/bin/env bash
# Turns fastattn_bench's JSON files into the report: a table, slopes, crossovers and plots.
#   scripts/report.sh DIR     (DIR/json/*.json in; DIR/report.md, DIR/*.tsv, DIR/*.png|svg out)
# Plain tools only: jq, awk, gnuplot.
set -euo pipefail
dir=$1
json=("$dir"/json/*.json)

# name <TAB> median wall-clock ms <TAB> flops/s <TAB> rel_err   (medians when repetitions > 1)
jq -r '
  .benchmarks[]
  | select(.run_type == "aggregate" and .aggregate_name == "median" or .run_type == "iteration")
  | [(.run_name // .name),
     ((if (.run_name // .name) | test("real_time") then .real_time else .cpu_time end) * (if .time_unit == "ns" then 1e-6 elif .time_unit == "us" then 1e-3
                    elif .time_unit == "s" then 1e3 else 1 end)),
     (.flops // ""), (.rel_err // ""), .run_type]
  | @tsv' "${json[@]}" |
  # keep the median when a benchmark has aggregates; the single run otherwise
  awk -F'\t' '{ if ($5 == "aggregate" || !($1 in seen)) row[$1] = $1 "\t" $2 "\t" $3 "\t" $4; seen[$1] = 1 }
              END { for (k in row) print row[k] }' | sort > "$dir/results.tsv"

kernels="dense clustered improved_clustered smyrf"
approx="clustered improved_clustered smyrf"

awk -F'\t' -v approx="$approx" -v out="$dir" '
  function fmt_ms(x) { return x == "" ? "-" : (x >= 100 ? sprintf("%.0f", x) : (x >= 10 ? sprintf("%.1f", x) : sprintf("%.2f", x))) }
  {
    name = $1
    if (name == "fma_peak") { peak = $3; next }
    if (name ~ /^multihead\//) { split(name, p, "/"); sub(/threads:/, "", p[3]); mt[p[2], p[3]] = $2; mk[p[2]] = 1; next }
    if (name ~ /^sweep\//) { print name "\t" $2 "\t" $4 > (out "/sweep.tsv"); next }
    if (split(name, p, "/N:") != 2) next
    k = p[1]; n = p[2] + 0
    t[k, n] = $2; e[k, n] = $4; fl[k, n] = $3; has[k] = 1; ns[n] = 1
  }
  END {
    nn = 0; for (n in ns) list[++nn] = n + 0
    for (i = 1; i <= nn; i++) for (j = i + 1; j <= nn; j++) if (list[j] < list[i]) { x = list[i]; list[i] = list[j]; list[j] = x }
    na = split(approx, A, " ")
    # table of medians
    hdr = "| N | dense ms | dense_naive ms | gemm_bound ms | dense / gemm_bound | dense % of fma_peak |"
    sep = "|---|---|---|---|---|---|"
    for (a = 1; a <= na; a++) if (has[A[a]]) { hdr = hdr " " A[a] " ms | speed-up |"; sep = sep "---|---|" }
    hdr = hdr " rel_err dense |"; sep = sep "---|"
    for (a = 1; a <= na; a++) if (has[A[a]]) { hdr = hdr " rel_err " A[a] " |"; sep = sep "---|" }
    print hdr > (out "/table.md"); print sep > (out "/table.md")
    for (i = 1; i <= nn; i++) {
      n = list[i]
      row = "| " n " | " fmt_ms(t["dense", n]) " | " fmt_ms(t["dense_naive", n]) " | " fmt_ms(t["gemm_bound", n]) " | "
      row = row ((t["dense", n] != "" && t["gemm_bound", n] != "") ? sprintf("%.2f", t["dense", n] / t["gemm_bound", n]) : "-") " | "
      row = row ((peak != "" && fl["dense", n] != "") ? sprintf("%.0f%%", 100 * fl["dense", n] / peak) : "-") " |"
      for (a = 1; a <= na; a++) if (has[A[a]]) {
        k = A[a]
        row = row " " fmt_ms(t[k, n]) " | " ((t[k, n] != "" && t["dense", n] != "") ? sprintf("%.1fx", t["dense", n] / t[k, n]) : "-") " |"
      }
      row = row " " (e["dense", n] == "" ? "-" : sprintf("%.2g", e["dense", n])) " |"
      for (a = 1; a <= na; a++) if (has[A[a]]) row = row " " (e[A[a], n] == "" ? "-" : sprintf("%.3g", e[A[a], n])) " |"
      print row > (out "/table.md")
    }
    # time per kernel for plotting: N then one column per kernel
    printf "N" > (out "/time_vs_n.tsv")
    split("dense dense_naive gemm_bound " approx, P, " ")
    for (c = 1; c in P; c++) printf "\t%s", P[c] > (out "/time_vs_n.tsv")
    printf "\n" > (out "/time_vs_n.tsv")
    for (i = 1; i <= nn; i++) {
      n = list[i]; printf "%d", n > (out "/time_vs_n.tsv")
      for (c = 1; c in P; c++) printf "\t%s", (t[P[c], n] == "" ? "NaN" : t[P[c], n]) > (out "/time_vs_n.tsv")
      printf "\n" > (out "/time_vs_n.tsv")
    }
    # log-log slope over the largest N (N >= 4096, or the top half of what ran), and crossovers
    print "| kernel | log-log slope (N range) | crossover with dense |" > (out "/slopes.md")
    print "|---|---|---|" > (out "/slopes.md")
    split("dense gemm_bound " approx, S, " ")
    for (s = 1; s in S; s++) {
      k = S[s]; if (!has[k]) continue
      sx = sy = sxx = sxy = m = 0; lo = hi = ""
      for (i = 1; i <= nn; i++) { n = list[i]; if (t[k, n] == "" || (n < 4096 && list[nn] >= 8192)) continue
        x = log(n); y = log(t[k, n]); sx += x; sy += y; sxx += x * x; sxy += x * y; m++
        if (lo == "") lo = n; hi = n }
      slope = (m >= 2) ? sprintf("%.2f (%d-%d)", (m * sxy - sx * sy) / (m * sxx - sx * sx), lo, hi) : "-"
      cross = "-"
      if (k != "dense" && k != "gemm_bound") {
        cross = "slower than dense at every N run"
        for (i = nn; i >= 1; i--) { n = list[i]; if (t[k, n] == "" || t["dense", n] == "") continue
          if (t[k, n] < t["dense", n]) cross = "faster from N = " n; else break }
      }
      print "| " k " | " slope " | " cross " |" > (out "/slopes.md")
    }
    # thread scaling
    print "| kernel (B = 1, H = 8, N = 4096) | 1 thread ms | 2 threads ms | speed-up |" > (out "/threads.md")
    print "|---|---|---|---|" > (out "/threads.md")
    for (k in mk) if (mt[k, 1] != "" && mt[k, 2] != "")
      printf "| %s | %s | %s | %.2fx |\n", k, fmt_ms(mt[k, 1]), fmt_ms(mt[k, 2]), mt[k, 1] / mt[k, 2] > (out "/threads.md")
    if (peak != "") printf "fma_peak: %.1f GFLOP/s (one core, fp32)\n", peak / 1e9 > (out "/peak.txt")
  }' "$dir/results.tsv"

# error_vs_time: one point per knob setting at fixed N (sweep/<kernel>/<setting>/N:<n>)
if [ -s "$dir/sweep.tsv" ]; then
  sort "$dir/sweep.tsv" | awk -F'\t' '{ split($1, p, "/"); print p[2] "\t" p[3] "\t" $2 "\t" $3 }' > "$dir/error_vs_time.tsv"
fi

if command -v gnuplot >/dev/null 2>&1; then
  for term in pngcairo svg; do
    ext=$([ "$term" = svg ] && echo svg || echo png)
    gnuplot <<GP
set terminal $term size 900,600 noenhanced $([ "$term" = pngcairo ] && echo "font ',11'")
set output "$dir/time_vs_n.$ext"
set title "fastattn: time per head vs sequence length (E = M = 64, float, one thread)"
set logscale xy 2
set xlabel "N (queries = keys)"
set ylabel "median CPU time per call (ms)"
set key top left
set grid
set datafile missing "NaN"
plot for [c=2:7] "$dir/time_vs_n.tsv" using 1:(c == 4 ? NaN : column(c)) with linespoints lw 2 title columnheader(c), \
     "$dir/time_vs_n.tsv" using 1:4 with lines lw 2 dt 2 lc rgb "gray40" title "gemm_bound (floor of dense)"
GP
    if [ -s "$dir/error_vs_time.tsv" ]; then
      gnuplot <<GP
set terminal $term size 900,600 noenhanced $([ "$term" = pngcairo ] && echo "font ',11'")
set output "$dir/error_vs_time.$ext"
set title "fastattn: relative error vs time at N = 4096, one point per knob setting"
set logscale xy
set xlabel "median time per call (ms)"
set ylabel "relative Frobenius error vs exact"
set grid
set key top right
plot for [k in "clustered improved_clustered smyrf"] "< grep '^".k."\t' $dir/error_vs_time.tsv" using 3:4 with points pt 7 ps 1.4 title k, \
     for [k in "clustered improved_clustered smyrf"] "< grep '^".k."\t' $dir/error_vs_time.tsv" using 3:4:2 with labels offset 0,1 font ",9" notitle
GP
    fi
  done
fi
