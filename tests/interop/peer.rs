//! The Python peer of the interop tests: runs `ce_peer.py` (the Python
//! `cloudevents` SDK, see `requirements.txt` next to it), and compares the
//! events it reports or writes with ours, attribute by attribute.
//!
//! Never skips: without `python3` or its packages every test fails, naming
//! what to install.

use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use broker_adapters::binding::Mode;
use broker_adapters::cloudevents::AttributesReader as _;
use broker_adapters::cloudevents::event::{TryIntoTime as _, TryIntoUrl as _};
use broker_adapters::{CloudEventBuilder, Event, EventExt as _};
use serde_json::{Map, Value, json};

/// The interpreter the peer runs on.
const PYTHON: &str = "python3";

/// The peer script.
const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/ce_peer.py");

/// What to run when the peer's packages are missing (from the repository root).
const INSTALL_HINT: &str = "python3 -m pip install -r tests/interop/requirements.txt \
     (`source tests/harness/up.sh` does it: it installs cloudevents==2.2.0, \
     confluent-kafka==2.16.1 and nats-py==2.16.0 when they are missing)";

/// How long the peer itself waits for a message or an acknowledgement.
const PEER_WAIT: Duration = Duration::from_secs(12);

/// How long the peer process may run in all: its own wait plus start-up.
const PEER_LIMIT: Duration = Duration::from_secs(20);

/// A `subject` that needs escaping in header-based bindings: spaces, a
/// double quote, a percent sign and non-ASCII letters.
pub(crate) const SUBJECT: &str = "order 4711: Grüße \"eilig\" 100%";

/// The `time` of the test events: microsecond precision, the finest a
/// Python `datetime` holds.
const TIME: &str = "2026-03-14T15:09:26.535897Z";

/// The binding mode as the peer's `--mode` takes it.
pub(crate) fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Structured => "structured",
        _ => "binary",
    }
}

/// An event as the peer's `--event` takes it: every core attribute, the
/// extensions the system uses (an integer and a custom boolean among them),
/// and JSON data with a nested object and non-ASCII text. The id is unique.
pub(crate) fn event_spec(subject: &str) -> Value {
    json!({
        "attributes": {
            "specversion": "1.0",
            "id": e2e::unique_name("interop-event"),
            "source": "/interop/orders",
            "type": "com.example.order.placed",
            "subject": subject,
            "time": TIME,
            "dataschema": "https://schemas.example.com/orders/placed/v1.json",
            "datacontenttype": "application/json",
            "partitionkey": "order-4711",
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
            "sagaid": "saga-0193f0c2",
            "sagastep": "reserve-stock",
            "sagaattempt": 3,
            "correlationid": "corr-2a9e",
            "causationid": "cause-77f1",
            "expedited": true,
        },
        "data": {
            "order": {
                "id": "4711",
                "lines": [{"sku": "ÄÖÜ-ß", "qty": 2}],
                "total": {"cents": 12999, "currency": "EUR"},
            },
            "note": "Grüße aus Köln – 注文 🚀",
        },
    })
}

/// Builds our event from `spec` (see [`event_spec`]) with our builder.
pub(crate) fn our_event(spec: &Value) -> anyhow::Result<Event> {
    let attrs = &spec["attributes"];
    let text = |name: &str| {
        attrs[name]
            .as_str()
            .with_context(|| format!("the spec's `{name}` is not a string"))
    };
    let attempt = attrs["sagaattempt"]
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .context("the spec's `sagaattempt` is not a small integer")?;
    let expedited = attrs["expedited"]
        .as_bool()
        .context("the spec's `expedited` is not a boolean")?;
    let event = CloudEventBuilder::new(text("type")?, text("source")?)
        .id(text("id")?)
        .subject(text("subject")?)
        .time(text("time")?.into_time()?)
        .dataschema(text("dataschema")?.into_url()?)
        .partition_key(text("partitionkey")?)
        .traceparent(text("traceparent")?)
        .tracestate(text("tracestate")?)
        .saga(text("sagaid")?, text("sagastep")?, attempt)
        .correlation_id(text("correlationid")?)
        .causation_id(text("causationid")?)
        .extension("expedited", expedited)
        .json_data(&spec["data"])
        .build()?;
    ensure!(
        event.datacontenttype() == Some("application/json"),
        "json_data sets datacontenttype application/json"
    );
    Ok(event)
}

/// Every attribute of `event` (extensions included) as the JSON event format
/// writes them, without the data.
pub(crate) fn attributes_of(event: &Event) -> anyhow::Result<Map<String, Value>> {
    let Value::Object(mut attrs) = serde_json::to_value(event)? else {
        bail!("an event serializes to a JSON object");
    };
    attrs.remove("data");
    attrs.remove("data_base64");
    Ok(attrs)
}

/// The event's data as JSON.
pub(crate) fn data_of(event: &Event) -> anyhow::Result<Value> {
    Ok(event.data_as::<Value>()?)
}

/// Checks that `got` holds exactly the attributes of `expected`, with equal
/// values: `time` as instants; the rest as JSON values in structured mode,
/// where the event format keeps integer and boolean extensions typed, and as
/// strings in binary mode, where every value travels as a header string.
///
/// Booleans compare ignoring ASCII case in binary mode: the Python SDK 2.2.0
/// writes a `True` Python bool as the header `True` (Python's `str(True)`),
/// where the CloudEvents type system's canonical string is `true`.
pub(crate) fn assert_same_attributes(
    what: &str,
    expected: &Map<String, Value>,
    got: &Map<String, Value>,
    mode: Mode,
) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for (name, want) in expected {
        let Some(have) = got.get(name) else {
            problems.push(format!("`{name}` is missing (expected {want})"));
            continue;
        };
        let same = if name == "time" {
            let instant = |v: &Value| v.as_str().and_then(|s| s.into_time().ok());
            instant(want).is_some() && instant(want) == instant(have)
        } else if mode == Mode::Structured {
            want == have
        } else if want.is_boolean() {
            text(want).eq_ignore_ascii_case(&text(have))
        } else {
            text(want) == text(have)
        };
        if !same {
            problems.push(format!("`{name}`: expected {want}, got {have}"));
        }
    }
    for (name, have) in got {
        if !expected.contains_key(name) {
            problems.push(format!("`{name}` is unexpected (got {have})"));
        }
    }
    ensure!(
        problems.is_empty(),
        "{what} ({} mode): attributes differ:\n  {}\nexpected: {}\ngot:      {}",
        mode_name(mode),
        problems.join("\n  "),
        Value::Object(expected.clone()),
        Value::Object(got.clone()),
    );
    Ok(())
}

/// Checks what the peer reported reading against the event we sent.
pub(crate) fn assert_peer_read(sent: &Event, report: &Value, mode: Mode) -> anyhow::Result<()> {
    let got = report["attributes"]
        .as_object()
        .context("the peer's report has no attributes")?;
    assert_same_attributes(
        "the Python SDK read our event",
        &attributes_of(sent)?,
        got,
        mode,
    )?;
    ensure!(
        report["data"] == data_of(sent)?,
        "the Python SDK read our data as {}, we sent {}",
        report["data"],
        data_of(sent)?,
    );
    Ok(())
}

/// Checks the event we received against the spec the peer wrote.
pub(crate) fn assert_we_read(spec: &Value, received: &Event, mode: Mode) -> anyhow::Result<()> {
    let want = spec["attributes"]
        .as_object()
        .context("the spec has no attributes")?;
    assert_same_attributes(
        "we read the Python SDK's event",
        want,
        &attributes_of(received)?,
        mode,
    )?;
    ensure!(
        data_of(received)? == spec["data"],
        "we read the Python SDK's data as {}, it sent {}",
        data_of(received)?,
        spec["data"],
    );
    // Our typed accessors read the values whichever form they came in.
    ensure!(
        received.saga_attempt()?
            == spec["attributes"]["sagaattempt"]
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
    );
    ensure!(received.partition_key() == spec["attributes"]["partitionkey"].as_str());
    ensure!(received.traceparent() == spec["attributes"]["traceparent"].as_str());
    Ok(())
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Runs `ce_peer.py COMMAND ARGS --timeout ...` and returns the JSON line it
/// prints. Fails, with the peer's stderr, if it cannot start, fails, or
/// outlives its time limit.
pub(crate) async fn run(command: &str, args: &[(&str, &str)]) -> anyhow::Result<Value> {
    let mut cmd = Command::new(PYTHON);
    cmd.arg(SCRIPT).arg(command);
    for (flag, value) in args {
        cmd.arg(flag).arg(value);
    }
    cmd.arg("--timeout")
        .arg(PEER_WAIT.as_secs().to_string())
        .env("PYTHONIOENCODING", "utf-8")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!(
                "`{PYTHON}` is not on PATH: the interop tests run the Python CloudEvents SDK \
                 as the other implementation and never skip. Install Python 3 (apt-get install \
                 python3 python3-pip), then {INSTALL_HINT}"
            )
        } else {
            anyhow!("cannot start `{PYTHON} {SCRIPT}`: {e}")
        }
    })?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status: ExitStatus = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > PEER_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "ce_peer.py {command} did not finish within {PEER_LIMIT:?}; its stderr:\n{}",
                joined(stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let (stdout, stderr) = (joined(stdout), joined(stderr));
    let elapsed = started.elapsed();
    if !status.success() {
        let why = match status.code() {
            Some(3) => format!("Python packages are missing; install them: {INSTALL_HINT}"),
            Some(4) => "it timed out waiting for the broker".to_owned(),
            Some(code) => format!("exit status {code}"),
            None => format!("{status}"),
        };
        bail!(
            "ce_peer.py {command} failed after {elapsed:.1?}: {why}\n--- its stderr:\n{stderr}--- its stdout:\n{stdout}"
        );
    }
    if !stderr.trim().is_empty() {
        eprintln!("ce_peer.py {command} stderr:\n{stderr}");
    }
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .with_context(|| format!("ce_peer.py {command} printed nothing; its stderr:\n{stderr}"))?;
    let report: Value = serde_json::from_str(line)
        .with_context(|| format!("ce_peer.py {command} printed `{line}`, not JSON"))?;
    eprintln!("ce_peer.py {command} ({elapsed:.1?}): {report}");
    Ok(report)
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut out);
        }
        String::from_utf8_lossy(&out).into_owned()
    })
}

fn joined(handle: std::thread::JoinHandle<String>) -> String {
    handle
        .join()
        .unwrap_or_else(|_| "<the reader thread panicked>".to_owned())
}
