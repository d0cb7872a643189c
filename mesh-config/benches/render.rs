//! How rendering and validation scale with the number of peers.
//!
//! Each peer has one outbound link (`11366:mpc`) and one inbound link (`9092:flower`), so a
//! peer costs 11 objects. Run with `cargo bench -p fedmesh-mesh-config --bench render`.
//! Criterion's `render/N` includes dropping the result; `validate/N` validates a rendered set
//! with validators built once. A summary then splits render, drop and validate, per peer, with
//! the 500/10 ratio (linear growth gives ~50).

use std::{
    collections::BTreeMap,
    hint::black_box,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use criterion::{BenchmarkId, Criterion};
use fedmesh_documents::{EffectiveLink, LinkTerms, NodeRef};
use fedmesh_istio_schema::Schemas;
use fedmesh_mesh_config::{NodeView, Peer, RenderOptions, render};

const SIZES: [usize; 3] = [10, 100, 500];

fn node(org: usize) -> NodeRef {
    NodeRef {
        org: format!("org-{org}"),
        node: "n1".into(),
    }
}

fn link(from: NodeRef, to: NodeRef, port: &str) -> EffectiveLink {
    let ports = vec![port.parse().expect("port spec")];
    let terms = LinkTerms::new("bench", from, to, ports, 4_102_444_800, None).expect("terms");
    EffectiveLink {
        terms,
        approved_by: "Owner".into(),
        approved_at: 0,
    }
}

fn view(peers: usize) -> NodeView {
    let local = node(0);
    let mut view = NodeView {
        collab: "bench".into(),
        local: local.clone(),
        members: (0..=peers).map(node).collect(),
        peers: BTreeMap::new(),
        links: Vec::new(),
        services: BTreeMap::new(),
        vips: BTreeMap::new(),
        credentials: None,
        carried: BTreeMap::new(),
    };
    for i in 1..=peers {
        let gateway = format!("gw.org-{i}.example:443").parse().expect("gateway");
        view.peers.insert(node(i), Peer { gateway });
        view.links.push(link(local.clone(), node(i), "11366:mpc"));
        view.links.push(link(node(i), local.clone(), "9092:flower"));
    }
    view
}

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_893_456_000)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let start = Instant::now();
    let schemas = Schemas::istio().expect("Istio CRD schemas");
    let build = start.elapsed();
    let options = RenderOptions::default();

    let mut c = Criterion::default().configure_from_args();
    {
        let mut group = c.benchmark_group("render");
        for n in SIZES {
            let v = view(n);
            group.bench_with_input(BenchmarkId::from_parameter(n), &v, |b, v| {
                b.iter(|| render(black_box(v), &options, now()).expect("render"));
            });
        }
    }
    {
        let mut group = c.benchmark_group("validate");
        for n in SIZES {
            let rendered = render(&view(n), &options, now()).expect("render");
            group.bench_with_input(BenchmarkId::from_parameter(n), &rendered, |b, r| {
                b.iter(|| schemas.validate_all(black_box(&r.objects)).expect("valid"));
            });
        }
    }
    c.final_summary();

    println!("\nsummary (median of 21 runs; Istio schemas built once, in {build:.2?}):");
    println!("peers  objects     render  per peer      drop  per peer   validate  per peer");
    let mut totals = BTreeMap::new();
    for n in SIZES {
        let v = view(n);
        let (mut built, mut dropped, mut checked) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..21 {
            let start = Instant::now();
            let rendered = black_box(render(&v, &options, now()).expect("render"));
            built.push(start.elapsed());
            let start = Instant::now();
            black_box(schemas.validate_all(&rendered.objects)).expect("valid");
            checked.push(start.elapsed());
            let start = Instant::now();
            drop(rendered);
            dropped.push(start.elapsed());
        }
        let objects = render(&v, &options, now()).expect("render").objects.len();
        let (r, d, c) = (median(built), median(dropped), median(checked));
        let per = |t: Duration| t / u32::try_from(n).unwrap_or(u32::MAX);
        println!(
            "{n:>5}  {objects:>7}  {r:>9.2?}  {:>8.2?}  {d:>8.2?}  {:>8.2?}  {c:>9.2?}  {:>8.2?}",
            per(r),
            per(d),
            per(c)
        );
        totals.insert(n, (r, d, c));
    }
    let ratio = |f: fn(&(Duration, Duration, Duration)) -> Duration| {
        f(&totals[&500]).as_secs_f64() / f(&totals[&10]).as_secs_f64()
    };
    println!(
        "500/10 ratio: render {:.1}, drop {:.1}, validate {:.1} (linear = 50)",
        ratio(|t| t.0),
        ratio(|t| t.1),
        ratio(|t| t.2)
    );
}
