"""Buckets the samples of `perf script` output (perf record --call-graph dwarf) by what the
server was doing: walking each stack from the leaf up, skipping kernel and libc frames, the
first of our own or a dependency's frames that matches a bucket decides it (so malloc,
memcpy and syscalls count toward whoever called them). Used by bench/profile.

    python3 bench/perf_categories.py perf.script
"""
import sys, collections, re
def strip(sym):
    out=[];d=0
    lead = sym.startswith('<')
    for ch in sym:
        if ch=='<':
            d+=1
            if lead and d==1: out.append(ch); continue
        if ch=='>':
            d-=1
            if lead and d==0: out.append(ch); lead=False; continue
        if d==0 or (lead and d==1): out.append(ch)
    return ''.join(out)
# Module paths as of issue 11; keys are substrings of demangled symbols, and the first
# category (in this order) that matches the first deciding frame wins.
cats = [
 ("inference (tract plan, session, stats)", ["tract_", "mcd_serve::engine", "mcd_serve::model", "mcd_serve::uncertainty", "mcd_serve::masks"]),
 ("request JSON parse + tensor build", ["serde_json::de", "serde::de", "serde_core::de", "parse_request", "mcd_serve::tensor_json", "mcd_serve::core::tensors", "front::native::json::collect", "front::native::json::build", "front::native::json::to_tensor", "serde_json::value::de", "from_slice"]),
 ("per-request log line (tracing fmt + write)", ["tracing_subscriber", "std::fs::File as std::io::Write", "tracing_core"]),
 ("response JSON build", ["serde_json::ser", "serde_json::value::ser", "tensor_to_json", "floats_to_json", "front::native::json::nest", "to_vec", "to_string", "serde_json::value::to_value"]),
 ("metrics (prometheus)", ["prometheus", "mcd_serve::core::metrics"]),
 ("hand-off to inference (spawn_blocking, queues, channels, semaphores)", ["tokio::runtime::blocking", "spawn_blocking", "tokio::sync", "on_pool", "mcd_serve::core::admission", "mcd_serve::core::batcher", "std::sync::mpmc", "std::sync::poison::condvar", "std::sys::sync", "crossbeam", "flume", "async_channel"]),
 ("tokio scheduler/park/wake", ["tokio::runtime::scheduler", "tokio::runtime::park", "tokio::runtime::driver", "tokio::runtime::io", "mio::", "tokio::runtime::task", "tokio::runtime::time", "std::thread"]),
 ("hyper + socket I/O", ["hyper", "tokio::net", "TcpStream", "PollEvented", "http::header", "httparse", "bytes::"]),
 ("axum/tower routing + middleware", ["tower_http", "axum", "tower::", "futures_util"]),
 ("handler (mcd_serve other)", ["mcd_serve::"]),
]
c=collections.Counter(); k=collections.Counter(); total=0; stack=[]
def classify(stack):
    for fr in stack:
        m=re.match(r'\s*[0-9a-f]+ (.*) \((.*)\)$', fr)
        if not m: continue
        sym, dso = m.groups()
        if 'kallsyms' in dso or 'libc.so' in dso or 'libm' in dso or 'vdso' in dso: continue
        s=strip(sym)
        for name, keys in cats:
            if any(key in s for key in keys): return name
    return "other/unknown"
def flush():
    global total
    if not stack: return
    total+=1
    cat=classify(stack[1:]); c[cat]+=1
    if 'kallsyms' in stack[1]: k[cat]+=1
for line in open(sys.argv[1], errors="replace"):
    if not line.strip(): flush(); stack.clear(); continue
    stack.append(line.rstrip('\n'))
flush()
print(f"{'share':>6} {'(kernel part)':>13}  category")
for name,v in c.most_common():
    print(f"{v/total*100:5.1f}% {k[name]/total*100:12.1f}%  {name}")
print("samples", total, "kernel", sum(k.values())/total*100)
