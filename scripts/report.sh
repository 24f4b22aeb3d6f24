#!/usr/bin/env bash
# Turns fastattn_bench's JSON files into the report: a table, slopes, crossovers and plots.
#   scripts/report.sh DIR     (DIR/json/*.json in; DIR/report.md, DIR/*.tsv, DIR/*.png|svg out)
# Plain tools only: jq, awk, gnuplot. The kernels are read from the benchmark names
# (`<kernel>/N:<N>`, the baselines gemm_bound and dense_naive aside), so a kernel added to the
# library is reported without edits here.
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

# The size series `<name>/N:<N>` are the kernels and the two baselines. `kernels` lists dense
# first (the exact kernel the others are compared with), then `approx`: every other kernel, by
# name.
baselines="gemm_bound dense_naive"
series=$(awk -F'\t' '$1 ~ /^[^\/]+\/N:[0-9]+$/ { sub(/\/N:.*/, "", $1); print $1 }' "$dir/results.tsv" | sort -u)
approx=""
for k in $series; do
  case " dense $baselines " in *" $k "*) ;; *) approx="$approx $k" ;; esac
done
approx=${approx# }
kernels=$approx
if grep -qx dense <<<"$series"; then kernels="dense${approx:+ $approx}"; fi

awk -F'\t' -v approx="$approx" -v kernels="$kernels" -v out="$dir" '
  function fmt_ms(x) { return x == "" ? "-" : (x >= 100 ? sprintf("%.0f", x) : (x >= 10 ? sprintf("%.1f", x) : sprintf("%.2f", x))) }
  {
    name = $1
    if (name == "fma_peak") { peak = $3; next }
    if (name ~ /^multihead\/[^\/]+\/kv_heads:[0-9]+\//) { split(name, p, "/"); sub(/threads:/, "", p[4]); gq[p[2], p[4]] = $2; next }
    if (name ~ /^multihead\/[^\/]+\/heads:1\//) { split(name, p, "/"); sub(/threads:/, "", p[4]); m1[p[2], p[4]] = $2; next }
    if (name ~ /^multihead\//) { split(name, p, "/"); sub(/threads:/, "", p[3]); mt[p[2], p[3]] = $2; mk[p[2]] = 1; next }
    if (name ~ /^sweep\//) { print name "\t" $2 "\t" $4 > (out "/sweep.tsv"); next }
    if (name !~ /^[^\/]+\/N:[0-9]+$/) next  # variants (/causal, /window:W, ...) are not tabled
    split(name, p, "/N:"); k = p[1]; n = p[2] + 0
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
    nk = split(kernels, K, " ")
    for (a = 1; a <= nk; a++) { k = K[a]; done[k] = 1
      if (mt[k, 1] != "" && mt[k, 2] != "")
        printf "| %s | %s | %s | %.2fx |\n", k, fmt_ms(mt[k, 1]), fmt_ms(mt[k, 2]), mt[k, 1] / mt[k, 2] > (out "/threads.md") }
    for (k in mk) if (!(k in done) && mt[k, 1] != "" && mt[k, 2] != "")
      printf "| %s | %s | %s | %.2fx |\n", k, fmt_ms(mt[k, 1]), fmt_ms(mt[k, 2]), mt[k, 1] / mt[k, 2] > (out "/threads.md")
    # one head split across the threads
    print "" > (out "/threads.md")
    print "| kernel (B = 1, H = 1, N = 16384) | 1 thread ms | 2 threads ms | speed-up |" > (out "/threads.md")
    print "|---|---|---|---|" > (out "/threads.md")
    for (a = 1; a <= nk; a++) { k = K[a]
      if (m1[k, 1] != "" && m1[k, 2] != "")
        printf "| %s | %s | %s | %.2fx |\n", k, fmt_ms(m1[k, 1]), fmt_ms(m1[k, 2]), m1[k, 1] / m1[k, 2] > (out "/threads.md") }
    # grouped-query attention: 2 key/value heads for the 8 query heads, against 8
    print "" > (out "/threads.md")
    print "| kernel (B = 1, H = 8, H_kv = 2, N = 4096) | 1 thread ms | 2 threads ms | / H_kv = 8, 1 thread | / H_kv = 8, 2 threads |" > (out "/threads.md")
    print "|---|---|---|---|---|" > (out "/threads.md")
    for (a = 1; a <= nk; a++) { k = K[a]
      if (gq[k, 1] != "" && gq[k, 2] != "" && mt[k, 1] != "" && mt[k, 2] != "")
        printf "| %s | %s | %s | %.2f | %.2f |\n", k, fmt_ms(gq[k, 1]), fmt_ms(gq[k, 2]), gq[k, 1] / mt[k, 1], gq[k, 2] / mt[k, 2] > (out "/threads.md") }
    if (peak != "") printf "fma_peak: %.1f GFLOP/s (one core, fp32)\n", peak / 1e9 > (out "/peak.txt")
  }' "$dir/results.tsv"

# Variants (the benchmark contract, bench/bench_common.hpp): `<kernel>/N:<N>/causal`, `/window:<W>`,
# `/estimate`, `/E:<E>`, each beside the plain series: times, ratios, rel_err, and the causal
# series' log-log slopes.
awk -F'\t' -v out="$dir" '
  function fmt_ms(x) { return x == "" ? "-" : (x >= 100 ? sprintf("%.0f", x) : (x >= 10 ? sprintf("%.1f", x) : sprintf("%.2f", x))) }
  function ratio(a, b) { return (a == "" || b == "" || b == 0) ? "-" : sprintf("%.2f", a / b) }
  function err(x) { return x == "" ? "-" : sprintf("%.3g", x) }
  {
    if ($1 ~ /^[^\/]+\/N:[0-9]+$/) { split($1, p, "/N:"); t[p[1], p[2] + 0] = $2; fl[p[1], p[2] + 0] = $3; e[p[1], p[2] + 0] = $4; next }
    if ($1 !~ /^[^\/]+\/N:[0-9]+\/[^\/]+$/) next
    split($1, p, "/"); k = p[1]; n = substr(p[2], 3) + 0; v = p[3]
    vt[k, n, v] = $2; vf[k, n, v] = $3; ve[k, n, v] = $4; kinds[v] = 1; ks[k] = 1; ns[n] = 1
  }
  END {
    nn = 0; for (n in ns) list[++nn] = n + 0
    for (i = 1; i <= nn; i++) for (j = i + 1; j <= nn; j++) if (list[j] < list[i]) { x = list[i]; list[i] = list[j]; list[j] = x }
    nk = 0; for (k in ks) kl[++nk] = k
    for (i = 1; i <= nk; i++) for (j = i + 1; j <= nk; j++) if (kl[j] < kl[i]) { x = kl[i]; kl[i] = kl[j]; kl[j] = x }
    f = out "/variants.md"
    if ("causal" in kinds) {
      print "Causal attention (`<kernel>/N:<N>/causal`; rel_err against exact causal attention):\n" > f
      print "| kernel | N | causal ms | non-causal ms | causal / non-causal | speed-up over causal dense | rel_err causal | rel_err non-causal |" > f
      print "|---|---|---|---|---|---|---|---|" > f
      for (a = 1; a <= nk; a++) for (i = 1; i <= nn; i++) { k = kl[a]; n = list[i]
        if (vt[k, n, "causal"] == "") continue
        print "| " k " | " n " | " fmt_ms(vt[k, n, "causal"]) " | " fmt_ms(t[k, n]) " | " ratio(vt[k, n, "causal"], t[k, n]) " | " \
              (k == "dense" ? "-" : ratio(vt["dense", n, "causal"], vt[k, n, "causal"])) " | " err(ve[k, n, "causal"]) " | " err(e[k, n]) " |" > f }
      print "\n| kernel | causal log-log slope (N range) |\n|---|---|" > f
      for (a = 1; a <= nk; a++) { k = kl[a]; sx = sy = sxx = sxy = m = 0; lo = hi = ""
        for (i = 1; i <= nn; i++) { n = list[i]; if (vt[k, n, "causal"] == "" || (n < 4096 && list[nn] >= 8192)) continue
          x = log(n); y = log(vt[k, n, "causal"]); sx += x; sy += y; sxx += x * x; sxy += x * y; m++; if (lo == "") lo = n; hi = n }
        if (m >= 2) printf "| %s | %.2f (%d-%d) |\n", k, (m * sxy - sx * sy) / (m * sxx - sx * sx), lo, hi > f }
      print "" > f
    }
    for (v in kinds) if (v ~ /^window:/) {
      print "Exact local band (`<kernel>/N:<N>/" v "`):\n" > f
      print "| kernel | N | with band ms | without ms | ratio | rel_err with band | rel_err without |" > f
      print "|---|---|---|---|---|---|---|" > f
      for (a = 1; a <= nk; a++) for (i = 1; i <= nn; i++) { k = kl[a]; n = list[i]
        if (vt[k, n, v] == "") continue
        print "| " k " | " n " | " fmt_ms(vt[k, n, v]) " | " fmt_ms(t[k, n]) " | " ratio(vt[k, n, v], t[k, n]) " | " err(ve[k, n, v]) " | " err(e[k, n]) " |" > f }
      print "" > f
    }
    nd = 0; for (v in kinds) if (v ~ /^E:[0-9]+$/) dl[++nd] = substr(v, 3) + 0
    for (i = 1; i <= nd; i++) for (j = i + 1; j <= nd; j++) if (dl[j] < dl[i]) { x = dl[i]; dl[i] = dl[j]; dl[j] = x }
    if (nd > 0) {
      print "Head sizes (`<kernel>/N:<N>/E:<E>`, E = M; E = 64 is the plain series):\n" > f
      print "| kernel | N | E | ms | GFLOP/s | ms / ms at E = 64 | rel_err |" > f
      print "|---|---|---|---|---|---|---|" > f
      for (a = 1; a <= nk; a++) for (i = 1; i <= nn; i++) { k = kl[a]; n = list[i]
        if (vt[k, n, "E:" dl[1]] == "") continue
        if (t[k, n] != "") print "| " k " | " n " | 64 | " fmt_ms(t[k, n]) " | " (fl[k, n] == "" ? "-" : sprintf("%.1f", fl[k, n] / 1e9)) " | 1.00 | " err(e[k, n]) " |" > f
        for (d = 1; d <= nd; d++) { v = "E:" dl[d]; if (vt[k, n, v] == "") continue
          print "| " k " | " n " | " dl[d] " | " fmt_ms(vt[k, n, v]) " | " (vf[k, n, v] == "" ? "-" : sprintf("%.1f", vf[k, n, v] / 1e9)) " | " ratio(vt[k, n, v], t[k, n]) " | " err(ve[k, n, v]) " |" > f } }
      print "" > f
    }
    if ("estimate" in kinds) {
      print "Run-time error estimate (`<kernel>/N:<N>/estimate`, 32 sampled rows):\n" > f
      print "| kernel | N | with estimate ms | without ms | estimate cost |" > f
      print "|---|---|---|---|---|" > f
      for (a = 1; a <= nk; a++) for (i = 1; i <= nn; i++) { k = kl[a]; n = list[i]
        if (vt[k, n, "estimate"] == "" || t[k, n] == "") continue
        printf "| %s | %d | %s | %s | %.1f%% |\n", k, n, fmt_ms(vt[k, n, "estimate"]), fmt_ms(t[k, n]), 100 * (vt[k, n, "estimate"] / t[k, n] - 1) > f }
      print "" > f
    }
    if ("iid" in kinds) {
      print "iid inputs (`<kernel>/N:<N>/iid`: q, k, v iid N(0, 1) and a new output per call, as a user calls it; modes between processes: scripts/bench_processes.sh):\n" > f
      print "| kernel | N | iid ms | peaked ms | iid / peaked |" > f
      print "|---|---|---|---|---|" > f
      for (a = 1; a <= nk; a++) for (i = 1; i <= nn; i++) { k = kl[a]; n = list[i]
        if (vt[k, n, "iid"] == "") continue
        print "| " k " | " n " | " fmt_ms(vt[k, n, "iid"]) " | " fmt_ms(t[k, n]) " | " ratio(vt[k, n, "iid"], t[k, n]) " |" > f }
      print "" > f
    }
  }' "$dir/results.tsv"

# The mixed layer (bench_mix.cpp, `mix/<kernel>/<setting>`): 8 heads, 2 of them neighbour-offset,
# N = 4096; time, the layer's error, its worst head and the heads a guard sent to dense.
if [ -s "$dir/json/mix.json" ]; then
  {
    echo "Mixed layer (\`mix/<kernel>/<setting>\`: 8 heads of N = 4096, 2 neighbour-offset and 6 content-clustered; rel_err over the layer):"
    echo
    echo "| kernel | setting | ms per layer | speed-up over dense | rel_err | worst head | heads sent to dense |"
    echo "|---|---|---|---|---|---|---|"
    jq -r '
      [.benchmarks[] | select(.run_type == "aggregate" and .aggregate_name == "median" or .run_type == "iteration")]
      | (map(select((.run_name // .name) == "mix/dense/defaults")) | .[-1].cpu_time) as $dense
      | group_by(.run_name // .name) | map(.[-1])
      | .[] | (.run_name // .name | split("/")) as $n
      | "| \($n[1]) | \($n[2]) | \(.cpu_time * 100 | round / 100) | \(if $dense then ($dense / .cpu_time * 10 | round / 10 | tostring) + "x" else "-" end) | \(if .rel_err < 0.001 then "< 0.001" else (.rel_err * 1000 | round / 1000 | tostring) end) | \(if .worst_head < 0.001 then "< 0.001" else (.worst_head * 1000 | round / 1000 | tostring) end) | \(.fell_back) of 8 |"
    ' "$dir/json/mix.json"
    echo
  } > "$dir/mix.md"
fi

# error_vs_time: one point per knob setting at fixed N (sweep/<kernel>/<setting>/N:<n>), kernels
# by name, settings in natural order (clusters:25 before clusters:100)
if [ -s "$dir/sweep.tsv" ]; then
  awk -F'\t' '{ split($1, p, "/"); print p[2] "\t" p[3] "\t" $2 "\t" $3 }' "$dir/sweep.tsv" |
    sort -t$'\t' -k1,1 -k2,2V > "$dir/error_vs_time.tsv"
fi

# Plots. Every series is built from the data that is there: a column or a point without a
# positive value (a kernel that did not run at some N, a rel_err that is missing, or zero on a
# log axis) is left out instead of handed to gnuplot as an empty series. Each kernel has one
# colour in both plots; the error plot names its points in a legend (one entry per setting)
# rather than with labels next to points that sit too close to read.
# dense and dense_naive keep their colours; the other kernels take the palette in order.
declare -A colour=([dense]="#9400d3" [dense_naive]="#009e73")
palette=("#e69f00" "#0072b2" "#e51e10" "#000000" "#cc79a7" "#56b4e9" "#8c8c00" "#8b4513")
if [ -s "$dir/time_vs_n.tsv" ]; then
  c=0
  for k in $(head -1 "$dir/time_vs_n.tsv" | cut -f2-); do
    [ -n "${colour[$k]:-}" ] || [ "$k" = gemm_bound ] && continue
    colour[$k]=${palette[$((c % ${#palette[@]}))]}
    c=$((c + 1))
  done
fi
gp_quote() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }

# time_vs_n: one line per column of time_vs_n.tsv with at least one time; gemm_bound dashed.
time_plot=()
if [ -s "$dir/time_vs_n.tsv" ]; then
  col=1
  pt=4
  file=$(gp_quote "$dir/time_vs_n.tsv")
  for k in $(head -1 "$dir/time_vs_n.tsv" | cut -f2-); do
    col=$((col + 1))
    awk -F'\t' -v c="$col" 'NR > 1 && $c != "NaN" && $c + 0 > 0 { found = 1 } END { exit !found }' \
      "$dir/time_vs_n.tsv" || continue
    if [ "$k" = gemm_bound ]; then
      time_plot+=("$file using 1:$col with lines lw 2 dt 2 lc rgb \"gray40\" title \"gemm_bound (floor of dense)\"")
    else
      time_plot+=("$file using 1:$col with linespoints lw 2 pt $pt ps 1.2 lc rgb \"${colour[$k]:-black}\" title $(gp_quote "$k")")
      pt=$((pt + 2))
    fi
  done
fi

# error_vs_time: one legend entry per (kernel, setting): the kernel's colour, a marker per setting.
error_plot=()
error_n=4096
if [ -s "$dir/error_vs_time.tsv" ]; then
  error_n=$(awk -F'\t' '{ n = $1; sub(/.*\/N:/, "", n); print n; exit }' "$dir/sweep.tsv")
  line=-1
  prev=""
  markers=(7 5 9 11 13 15 6 4 8 10 12 14)
  file=$(gp_quote "$dir/error_vs_time.tsv")
  while IFS=$'\t' read -r k setting ms err; do
    line=$((line + 1))
    [ "$k" = "$prev" ] || { m=0; prev=$k; }
    awk -v t="$ms" -v e="$err" 'BEGIN { exit !(t + 0 > 0 && e + 0 > 0) }' || continue
    error_plot+=("$file every ::$line::$line using 3:4 with points pt ${markers[$((m % ${#markers[@]}))]} ps 1.6 lc rgb \"${colour[$k]:-black}\" title $(gp_quote "$k  $setting")")
    m=$((m + 1))
  done < "$dir/error_vs_time.tsv"
  # Tics at 1, 2, 5 x 10^d; axes a little wider than the points (gnuplot would round a log axis
  # out to whole decades).
  error_range=$(awk -F'\t' '$3 + 0 > 0 && $4 + 0 > 0 {
      if (n++ == 0) { x0 = x1 = $3; y0 = y1 = $4 }
      if ($3 < x0) x0 = $3; if ($3 > x1) x1 = $3; if ($4 < y0) y0 = $4; if ($4 > y1) y1 = $4 }
    END { if (n) printf "set xrange [%g:%g]\nset yrange [%g:%g]\n", x0 / 1.25, x1 * 1.25, y0 / 1.4, y1 * 1.4 }' \
    "$dir/error_vs_time.tsv")
  tics_125=$(awk 'BEGIN { split("1 2 5", m, " ")
    for (d = -6; d <= 6; d++) for (i = 1; i <= 3; i++) s = s (s == "" ? "" : ", ") m[i] * 10 ^ d
    print "(" s ")" }')
fi

join_plot() {
  local first=1 clause
  for clause in "$@"; do
    [ "$first" = 1 ] || printf ', \\\n     '
    printf '%s' "$clause"
    first=0
  done
}

if command -v gnuplot >/dev/null 2>&1; then
  for term in pngcairo svg; do
    ext=$([ "$term" = svg ] && echo svg || echo png)
    font=$([ "$term" = pngcairo ] && echo "font ',11'" || echo "font 'sans,11'")
    if [ ${#time_plot[@]} -gt 0 ]; then
      gnuplot <<GP
set terminal $term size 900,600 noenhanced $font
set output "$dir/time_vs_n.$ext"
set title "fastattn: time per head vs sequence length (E = M = 64, float, one thread)"
set logscale xy 2
set xlabel "N (queries = keys)"
set ylabel "median CPU time per call (ms)"
set key top left
set grid
set datafile missing "NaN"
plot $(join_plot "${time_plot[@]}")
GP
    fi
    if [ ${#error_plot[@]} -gt 0 ]; then
      gnuplot <<GP
set terminal $term size 1100,620 noenhanced $font
set output "$dir/error_vs_time.$ext"
set title "fastattn: relative error vs time at N = $error_n, one point per knob setting (others at defaults)"
set logscale xy
$error_range
set xtics $tics_125
set ytics $tics_125
set format x "%g"
set format y "%g"
set xlabel "median CPU time per call (ms)"
set ylabel "relative Frobenius error vs exact"
set grid
set key outside right top vertical Left reverse spacing 1.15 samplen 1 box
plot $(join_plot "${error_plot[@]}")
GP
    fi
  done
fi
