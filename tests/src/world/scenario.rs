//! The migration walk: `orders` moves from diego to k8s and back under steady load, while
//! k8s keeps calling `billing` in diego and diego keeps calling `echo` in k8s. The demo
//! prints it; the end-to-end tests assert on it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::client::{Load, Recorder, Row};
use super::net::Cluster;
use super::{Answer, App, Say, World};

/// How long each step keeps the load running once its change has landed.
#[derive(Clone, Copy, Debug)]
pub struct Pace {
    /// At least this long per step.
    pub min_step: Duration,
    /// And at least this many calls per caller per step.
    pub min_calls: usize,
    /// Calls per second per caller.
    pub rate: u32,
    /// Time allowed for any change to show (route propagation, drain).
    pub limit: Duration,
}

impl Pace {
    /// For tests: short steps, enough calls to mean something.
    pub fn quick() -> Pace {
        Pace {
            min_step: Duration::from_millis(300),
            min_calls: 20,
            rate: 50,
            limit: Duration::from_secs(10),
        }
    }

    /// For the demo: steps a person can follow.
    pub fn demo() -> Pace {
        Pace {
            min_step: Duration::from_secs(3),
            min_calls: 50,
            rate: 40,
            limit: Duration::from_secs(15),
        }
    }
}

/// The steps, in order (indexes into the table).
pub const STEPS: [&str; 6] = [
    "1 orders served in diego",
    "2 orders starts in k8s, exported",
    "3 cutover: diego stops exporting",
    "4 orders served by k8s via tunnel",
    "5 rollback: orders back in diego",
    "6 orders served in diego again",
];

/// The outcome of a walk.
pub struct Walked {
    /// Per step and caller.
    pub rows: Vec<Row>,
    /// The recorder, for further checks.
    pub recorder: Arc<Recorder>,
}

/// Sets up the apps of the scenario's first step: orders and billing in diego, echo in k8s,
/// each exported to the other cluster, and waits until both shims see them.
///
/// # Errors
/// Something does not come up in time.
pub async fn seed(world: &mut World, pace: &Pace) -> anyhow::Result<()> {
    world.start_app(Cluster::Diego, App::Orders).await?;
    world.start_app(Cluster::Diego, App::Billing).await?;
    world.start_app(Cluster::K8s, App::Echo).await?;
    world.export(Cluster::Diego, App::Orders).await?;
    world.export(Cluster::Diego, App::Billing).await?;
    world.export(Cluster::K8s, App::Echo).await?;
    for (c, app, want) in [
        (Cluster::Diego, App::Orders, Answer::Local),
        (Cluster::K8s, App::Orders, Answer::Egress),
        (Cluster::K8s, App::Billing, Answer::Egress),
        (Cluster::Diego, App::Echo, Answer::Egress),
    ] {
        world.wait_answer(c, app, want, pace.limit).await?;
    }
    Ok(())
}

/// The four callers of the scenario.
pub fn callers(world: &World) -> Vec<(super::client::Caller, Cluster)> {
    vec![
        (world.caller(Cluster::Diego, App::Orders), Cluster::Diego),
        (world.caller(Cluster::K8s, App::Orders), Cluster::K8s),
        (world.caller(Cluster::K8s, App::Billing), Cluster::K8s),
        (world.caller(Cluster::Diego, App::Echo), Cluster::Diego),
    ]
}

/// Starts steady load from the scenario's callers.
pub fn start_load(world: &World, recorder: &Arc<Recorder>, pace: &Pace) -> Load {
    let interval = Duration::from_secs(1) / pace.rate.max(1) * 2;
    let callers = callers(world)
        .into_iter()
        .map(|(caller, c)| (caller, world.net(c)))
        .collect();
    Load::start(recorder, callers, 2, interval)
}

/// Keeps the load on `step` until the pace is satisfied.
async fn hold(recorder: &Recorder, step: usize, pace: &Pace) {
    let start = Instant::now();
    loop {
        let counts = recorder.counts(step);
        if start.elapsed() >= pace.min_step
            && !counts.is_empty()
            && counts.iter().all(|&n| n >= pace.min_calls)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for every call that began before the route moved to finish, then drains and
/// stops the instance that no longer serves.
async fn retire(
    world: &mut World,
    recorder: &Recorder,
    c: Cluster,
    app: App,
    pace: &Pace,
    say: &Say,
) -> anyhow::Result<()> {
    let before = recorder.bump_epoch();
    let start = Instant::now();
    while recorder.in_flight_until(before) > 0 {
        anyhow::ensure!(
            start.elapsed() < pace.limit,
            "calls begun before the move still running after {:?}",
            pace.limit
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    world.stop_app(c, app).await?;
    say(format!(
        "    {} in {c} drained and stopped ({} ms after the move)",
        app.short(),
        start.elapsed().as_millis()
    ));
    Ok(())
}

/// Walks the migration and back under load. `say` gets one line per event.
///
/// # Errors
/// A change does not show within the pace's limit.
pub async fn walk(world: &mut World, pace: Pace, say: Say) -> anyhow::Result<Walked> {
    let recorder = Recorder::new();
    let load = start_load(world, &recorder, &pace);
    let result = steps(world, &recorder, &pace, &say).await;
    load.stop().await;
    result?;
    Ok(Walked {
        rows: recorder.summary(),
        recorder,
    })
}

async fn steps(
    world: &mut World,
    recorder: &Arc<Recorder>,
    pace: &Pace,
    say: &Say,
) -> anyhow::Result<()> {
    let (diego, k8s) = (Cluster::Diego, Cluster::K8s);
    let limit = pace.limit;
    let t0 = Instant::now();
    let stamp = move || format!("[{:5.1}s]", t0.elapsed().as_secs_f64());

    recorder.set_step(0);
    say(format!(
        "{} step {}: diego apps call orders via the shim ({}), k8s apps via the tunnel",
        stamp(),
        STEPS[0],
        world.shim_addr(diego)
    ));
    hold(recorder, 0, pace).await;

    recorder.set_step(1);
    let name = world.start_app(k8s, App::Orders).await?;
    let commands = world.export(k8s, App::Orders).await?;
    say(format!(
        "{} step {}: {name} started at {} (ready in its EndpointSlice); exported to diego:",
        stamp(),
        STEPS[1],
        world.instance_addr(k8s, App::Orders)
    ));
    show(say, &commands);
    let took = world
        .wait_answer(k8s, App::Orders, Answer::Local, limit)
        .await?;
    say(format!(
        "    k8s shim now answers orders with the local instance ({} ms)",
        took.as_millis()
    ));
    world
        .wait_route_count(diego, "k8s", 2, limit)
        .await
        .context("diego importing orders from k8s")?;
    say("    diego's route-sync imported it (conflict: diego's own route still wins)".into());
    let reason = world
        .wait_export_condition(App::Orders, "Valid", "True", limit)
        .await?;
    say(format!(
        "    k8s's route-sync set the ServiceExport's Valid condition: True ({reason})"
    ));
    hold(recorder, 1, pace).await;

    recorder.set_step(2);
    world.withdraw(diego, App::Orders).await?;
    say(format!(
        "{} step {}: orders removed from diego's routes",
        stamp(),
        STEPS[2]
    ));
    let took = world
        .wait_answer(diego, App::Orders, Answer::Egress, limit)
        .await?;
    let answered = world.resolve(diego, App::Orders).await?;
    say(format!(
        "    diego shim now answers orders with the egress {answered} ({} ms)",
        took.as_millis()
    ));
    retire(world, recorder, diego, App::Orders, pace, say).await?;
    hold(recorder, 2, pace).await;

    recorder.set_step(3);
    say(format!(
        "{} step {}: same name, served by k8s; k8s still calls billing in diego",
        stamp(),
        STEPS[3]
    ));
    hold(recorder, 3, pace).await;

    recorder.set_step(4);
    let name = world.start_app(diego, App::Orders).await?;
    world.export(diego, App::Orders).await?;
    say(format!(
        "{} step {}: {name} started, diego exports orders again",
        stamp(),
        STEPS[4]
    ));
    let took = world
        .wait_answer(diego, App::Orders, Answer::Local, limit)
        .await?;
    say(format!(
        "    diego shim answers orders with the local instance again ({} ms)",
        took.as_millis()
    ));
    world
        .wait_route_count(k8s, "diego", 2, limit)
        .await
        .context("k8s importing orders from diego")?;
    let commands = world.withdraw(k8s, App::Orders).await?;
    say("    k8s withdraws its route:".into());
    show(say, &commands);
    let took = world
        .wait_answer(k8s, App::Orders, Answer::Egress, limit)
        .await?;
    say(format!(
        "    k8s shim answers orders with its egress ({} ms)",
        took.as_millis()
    ));
    retire(world, recorder, k8s, App::Orders, pace, say).await?;
    hold(recorder, 4, pace).await;

    recorder.set_step(5);
    say(format!("{} step {}", stamp(), STEPS[5]));
    hold(recorder, 5, pace).await;
    Ok(())
}

/// Prints the commands an operator would type, as they ran.
fn show(say: &Say, commands: &[String]) {
    for c in commands {
        say(format!("      $ {c}"));
    }
}

/// The closing table.
pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<36} {:<16} {:>8} {:>8} {:>9} {:>9} {:>9}  {}\n",
        "step", "caller", "requests", "failures", "wrong app", "p50 ms", "p99 ms", "served by"
    );
    let mut last = usize::MAX;
    for r in rows {
        let step = if r.step == last {
            String::new()
        } else {
            STEPS.get(r.step).copied().unwrap_or("-").to_string()
        };
        last = r.step;
        let served: Vec<String> = r
            .served_by
            .iter()
            .map(|(who, n)| format!("{who} {n}"))
            .collect();
        out.push_str(&format!(
            "{:<36} {:<16} {:>8} {:>8} {:>9} {:>9.1} {:>9.1}  {}\n",
            step,
            r.caller,
            r.requests,
            r.failures,
            r.wrong_app,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
            if served.is_empty() {
                "-".to_string()
            } else {
                served.join(", ")
            }
        ));
        for e in &r.errors {
            out.push_str(&format!("{:<36}   ! {e}\n", ""));
        }
    }
    out
}
