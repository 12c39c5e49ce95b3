//! NATS JetStream on a nats-server of the test's own (file storage, a free
//! loopback port): stopped mid-stream and started again, no event whose
//! publish returned `Ok` may be lost, and a publish that failed while it
//! was down is not sent once it is back; and, counted by the server's
//! monitoring endpoint, a subscription's connection is closed once the
//! subscription and its deliveries are gone; TLS with a private CA and
//! client certificates (made by the test) works, and a certificate that
//! does not check out, a missing client certificate or a server without
//! TLS are configuration errors; user and password, token, and
//! credentials-file (JWT) authentication work for the broker and its
//! subscriptions, and rejected credentials are configuration errors.
//!
//! `source tests/harness/up.sh && cargo test -p e2e --test restart_nats`

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use broker_adapters::Topic;
use broker_adapters::nats::{NatsBroker, NatsConfig, Storage};
use e2e::process::{ServerProcess, find_program, free_port};
use e2e::restart::{
    a_frozen_broker_does_not_stall_a_running_subscription, acked_events_survive_a_broker_restart,
    shutdown_is_not_held_up_by_a_gone_broker,
};

const EVENTS: usize = 300;

/// A new directory for one test's server.
fn test_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(e2e::unique_name(name));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A started nats-server of the test's own with JetStream, storing in
/// `dir`, with `extra` arguments; and its client port.
async fn own_server(dir: &Path, extra: &[String]) -> anyhow::Result<(ServerProcess, u16)> {
    let program = find_program("nats-server", &["/usr/sbin/nats-server", "/usr/bin/nats-server"])
        .context(
            "nats-server is not installed: `source tests/harness/up.sh` installs it (Debian package nats-server)",
        )?;
    let port = free_port()?;
    let mut args = vec![
        "-a".to_owned(),
        "127.0.0.1".to_owned(),
        "-p".to_owned(),
        port.to_string(),
        "-js".to_owned(),
        "-sd".to_owned(),
        dir.join("store").display().to_string(),
    ];
    args.extend_from_slice(extra);
    let mut server = ServerProcess::new("nats-server", program, args, port, dir.join("server.log"));
    server.start().await?;
    Ok((server, port))
}

fn config(port: u16) -> NatsConfig {
    NatsConfig::builder()
        .url(format!("nats://127.0.0.1:{port}"))
        .storage(Storage::File)
        .request_timeout(Duration::from_secs(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_events_survive_a_nats_server_restart() -> anyhow::Result<()> {
    let dir = test_dir("e2e-nats-restart")?;
    let (mut server, port) = own_server(&dir, &[]).await?;
    let config = || config(port);
    let publisher = NatsBroker::connect(config()).await?;
    let subscriber = NatsBroker::connect(config()).await?;
    let topic = Topic::try_from("restart.events")?;
    publisher.provision(&topic).await?;

    let report = acked_events_survive_a_broker_restart(
        Arc::new(publisher),
        Arc::new(subscriber),
        &topic,
        "restart",
        &mut server,
        EVENTS,
    )
    .await?;
    println!("{report:?}");
    assert_eq!(
        report.delivered, EVENTS,
        "every acknowledged event delivered"
    );
    assert_eq!(report.refused_while_down, 1);

    server.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A publish while the server is down fails (retryable) once the request
/// timeout has passed, and the client is not left holding the event: it is
/// not sent when the connection comes back (async-nats would send what it
/// was handed while disconnected, long after the publish failed; an outbox
/// relay retrying through an outage would pile up copies in memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_failed_while_the_server_was_down_is_not_sent_later() -> anyhow::Result<()> {
    use broker_adapters::PublisherExt as _;

    let dir = test_dir("e2e-nats-down-publish")?;
    let (mut server, port) = own_server(&dir, &[]).await?;
    let broker = NatsBroker::connect(config(port)).await?;
    let topic = Topic::try_from("down.events")?;
    broker.provision(&topic).await?;
    broker
        .publish_json(&topic, "dev.backbone.test", "/restart", &1)
        .await?;

    server.stop().await?;
    let started = std::time::Instant::now();
    let err = broker
        .publish_json(&topic, "dev.backbone.test", "/restart", &2)
        .await
        .expect_err("the server is down");
    failed_in_time(&err, started);

    server.start().await?;
    publish_once_back(&broker, &topic, 3).await?;
    let client = async_nats::connect(format!("nats://127.0.0.1:{port}")).await?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js
        .get_stream(broker.stream_name(&topic))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let stored = stream
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .state
        .messages;
    assert_eq!(
        stored, 2,
        "the events published while the server was up, not the one that failed while it was down"
    );

    server.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// An ack the server cannot confirm, because it is down, fails (retryable)
/// once the request timeout has passed; once the server is back, acks are
/// confirmed again on the same subscription, and the group has nothing
/// left pending; acking the first event again then succeeds. (async-nats
/// keeps the failed ack and sends it after reconnecting, so the server may
/// count it late, or deliver the event again: either way nothing is lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_while_the_server_is_down_fails_and_acks_work_once_it_is_back() -> anyhow::Result<()>
{
    use broker_adapters::cloudevents::AttributesReader as _;
    use broker_adapters::{PublisherExt as _, SubscribeOptions, Subscriber as _};

    let dir = test_dir("e2e-nats-down-ack")?;
    let (mut server, port) = own_server(&dir, &[]).await?;
    let broker = NatsBroker::connect(config(port)).await?;
    let topic = Topic::try_from("down.acks")?;
    broker.provision(&topic).await?;
    let first_id = broker
        .publish_json(&topic, "dev.backbone.test", "/restart", &1)
        .await?;
    let options = SubscribeOptions::new("g")?.ack_wait(Duration::from_secs(3));
    let mut sub = broker.subscribe(&topic, options).await?;
    let mut first = next_within(&mut sub, "the first event").await?;
    assert_eq!(first.event().id(), first_id);

    server.stop().await?;
    let started = std::time::Instant::now();
    let err = first.ack().await.expect_err("the server is down");
    failed_in_time(&err, started);
    server.start().await?;
    let second_id = publish_once_back(&broker, &topic, 2).await?;
    loop {
        let mut delivery = next_within(&mut sub, "the second event").await?;
        let id = delivery.event().id().to_owned();
        anyhow::ensure!(
            id == first_id || id == second_id,
            "an event never published: {id}"
        );
        delivery
            .ack()
            .await
            .with_context(|| format!("acking {id} with the server back"))?;
        if id == second_id {
            break;
        }
    }

    // The failed ack may have reached the server late; acking again is
    // answered all the same.
    first
        .ack()
        .await
        .context("acking the first event again, with the server back")?;
    drop(first);

    let client = async_nats::connect(format!("nats://127.0.0.1:{port}")).await?;
    let js = async_nats::jetstream::new(client);
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(broker.stream_name(&topic))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .get_consumer("g")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let info = consumer.info().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    assert_eq!(
        (
            info.num_ack_pending,
            info.num_pending,
            info.ack_floor.stream_sequence
        ),
        (0, 0, 2),
        "both events acked, nothing pending: {info:?}"
    );

    sub.close().await?;
    broker.close().await?;
    server.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `err`, from an operation begun at `started` with the server down, is
/// retryable and came within the request timeout (2 s), with room to spare.
fn failed_in_time(err: &broker_adapters::Error, started: std::time::Instant) {
    assert!(err.is_retryable(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed within the request timeout (2 s): {:?}",
        started.elapsed()
    );
}

/// Publishes `n` once the restarted server takes it (within 30 s); its id.
async fn publish_once_back(broker: &NatsBroker, topic: &Topic, n: u32) -> anyhow::Result<String> {
    use broker_adapters::PublisherExt as _;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match broker
            .publish_json(topic, "dev.backbone.test", "/restart", &n)
            .await
        {
            Ok(id) => return Ok(id),
            Err(e) if e.is_retryable() && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e).context("publishing after the restart"),
        }
    }
}

/// The subscription's next delivery, within 30 s.
async fn next_within(
    sub: &mut broker_adapters::Subscription,
    what: &str,
) -> anyhow::Result<broker_adapters::Delivery> {
    use futures_util::StreamExt as _;
    tokio::time::timeout(Duration::from_secs(30), sub.next())
        .await
        .with_context(|| format!("{what}: nothing within 30 s"))?
        .with_context(|| format!("{what}: the subscription ended"))?
        .map_err(anyhow::Error::from)
}

/// Each subscription has a connection of its own, named after the client,
/// the topic and the group: it is open while the subscription is, stays
/// open while a delivery of it is unsettled (so the delivery can still be
/// acked), and is closed after that. Counted by the
/// server (`/connz`), so a leaked connection fails the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_closes_its_connection_when_it_is_done() -> anyhow::Result<()> {
    use broker_adapters::{PublisherExt, SubscribeOptions, Subscriber};
    use futures_util::StreamExt;

    let monitor = free_port()?;
    let dir = test_dir("e2e-nats-connections")?;
    let (mut server, port) = own_server(&dir, &["-m".to_owned(), monitor.to_string()]).await?;
    let http = reqwest::Client::new();
    let connections = || {
        let http = http.clone();
        async move {
            let connz: serde_json::Value = http
                .get(format!("http://127.0.0.1:{monitor}/connz"))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            let mut names = connz["connections"]
                .as_array()
                .with_context(|| format!("no connections in {connz}"))?
                .iter()
                .map(|c| c["name"].as_str().unwrap_or_default().to_owned())
                .collect::<Vec<_>>();
            names.sort();
            anyhow::Ok(names)
        }
    };
    // The server counts a closed connection gone shortly after the client
    // closes it.
    let expect = |n: usize, when: &'static str| {
        let connections = &connections;
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let now = connections().await?;
                if now.len() == n {
                    return anyhow::Ok(now);
                }
                anyhow::ensure!(
                    tokio::time::Instant::now() < deadline,
                    "{when}: connections {now:?}, expected {n}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    let broker = NatsBroker::connect(config(port).client_name("billing")).await?;
    let topic = Topic::try_from("connections.events")?;
    broker.provision(&topic).await?;
    expect(1, "the broker alone").await?;
    let options = || SubscribeOptions::new("g");
    let mut first = broker.subscribe(&topic, options()?).await?;
    let second = broker.subscribe(&topic, options()?).await?;
    let open = expect(3, "two subscriptions open").await?;
    // Each connection is named, for operators to tell them apart.
    assert_eq!(
        open,
        [
            "billing",
            "billing: subscription connections.events g",
            "billing: subscription connections.events g"
        ]
    );

    broker
        .publish_json(&topic, "dev.backbone.test", "/nats", &1)
        .await?;
    let mut held = tokio::time::timeout(Duration::from_secs(10), first.next())
        .await
        .context("no delivery")?
        .context("the subscription ended")??;
    second.close().await?;
    expect(2, "one subscription closed").await?;
    first.close().await?;
    expect(2, "a closed subscription with an unsettled delivery").await?;
    held.ack().await?;
    drop(held);
    expect(1, "every subscription and delivery gone").await?;

    Subscriber::close(&broker).await?;
    server.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// TLS to a server with a private CA that verifies client certificates:
/// with the CA file and a client certificate, the broker publishes, and a
/// subscription (on its own connection, with the same settings) receives
/// and acks. Without the CA file the server's certificate does not check
/// out: a configuration error, not retried; without the client certificate
/// the server refuses the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca_and_client_certificates() -> anyhow::Result<()> {
    let dir = test_dir("e2e-nats-tls")?;
    let certs = e2e::tls::certificates(&dir)?;
    let path = |p: &PathBuf| p.display().to_string();
    let tls = [
        "--tls".to_owned(),
        "--tlscert".to_owned(),
        path(&certs.server.0),
        "--tlskey".to_owned(),
        path(&certs.server.1),
        "--tlscacert".to_owned(),
        path(&certs.ca),
        "--tlsverify".to_owned(),
    ];
    let (mut server, port) = own_server(&dir, &tls).await?;

    let trusted = config(port)
        .tls_ca_file(&certs.ca)
        .tls_client_certificate(&certs.client.0, &certs.client.1);
    round_trip(trusted, "TLS").await?;

    refused_as_tls_config(
        config(port).tls_client_certificate(&certs.client.0, &certs.client.1),
        "the server's certificate is signed by a CA the client does not know",
    )
    .await;
    refused_as_tls_config(
        config(port).tls_ca_file(&certs.ca),
        "the server requires a client certificate",
    )
    .await;

    server.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Checks that connecting with `config` fails with a TLS configuration
/// error, not retried.
async fn refused_as_tls_config(config: NatsConfig, why: &str) {
    use broker_adapters::ErrorKind;

    let err = NatsBroker::connect(config).await.expect_err(why);
    assert!(
        matches!(err.kind(), ErrorKind::Config { key, .. } if key == "tls"),
        "{why}: {err:?}"
    );
    assert!(!err.is_retryable(), "{why}: {err:?}");
}

/// A client that requires TLS does not talk to a server without it: a
/// configuration error, not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_refuses_a_server_without_tls() -> anyhow::Result<()> {
    let dir = test_dir("e2e-nats-plain")?;
    let (mut server, port) = own_server(&dir, &[]).await?;
    refused_as_tls_config(config(port).tls_required(true), "the server offers no TLS").await;
    server.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Authentication against a server that requires it: with a user and
/// password, and with a token, the broker publishes and a subscription (on
/// its own connection, with the same credentials) receives; credentials the
/// server rejects are a configuration error, not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password_and_token_authentication() -> anyhow::Result<()> {
    use broker_adapters::ErrorKind;

    for (name, server_args, good, bad) in [
        (
            "e2e-nats-user",
            &["--user", "app", "--pass", "s3cret"][..],
            config(0).user_and_password("app", "s3cret"),
            config(0).user_and_password("app", "wrong"),
        ),
        (
            "e2e-nats-token",
            &["--auth", "t0ken"][..],
            config(0).token("t0ken"),
            config(0).token("wrong"),
        ),
    ] {
        let dir = test_dir(name)?;
        let args: Vec<String> = server_args.iter().map(|a| (*a).to_owned()).collect();
        let (mut server, port) = own_server(&dir, &args).await?;
        let url = format!("nats://127.0.0.1:{port}");
        round_trip(good.url(&url), name).await?;
        let err = NatsBroker::connect(bad.url(&url))
            .await
            .expect_err("the server rejects the credentials");
        assert!(
            matches!(err.kind(), ErrorKind::Config { key, .. } if key == "credentials"),
            "{name}: {err:?}"
        );
        assert!(!err.is_retryable(), "{name}: {err:?}");
        server.stop().await?;
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

/// Connects with `config`, publishes one event on a new topic and receives
/// and acks it through a subscription.
async fn round_trip(config: NatsConfig, what: &str) -> anyhow::Result<()> {
    use broker_adapters::cloudevents::AttributesReader;
    use broker_adapters::{PublisherExt, SubscribeOptions, Subscriber};
    use futures_util::StreamExt;

    let broker = NatsBroker::connect(config).await?;
    let topic = Topic::try_from("round.trip")?;
    broker.provision(&topic).await?;
    let mut sub = broker
        .subscribe(&topic, SubscribeOptions::new("g")?)
        .await?;
    let id = broker
        .publish_json(&topic, "dev.backbone.test", "/nats", &1)
        .await?;
    let mut delivery = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .with_context(|| format!("{what}: no delivery"))?
        .context("the subscription ended")??;
    anyhow::ensure!(delivery.event().id() == id, "{what}: another event");
    delivery.ack().await?;
    sub.close().await?;
    Subscriber::close(&broker).await?;
    Ok(())
}

/// A credentials file (a user JWT and its nkey seed, as `nsc` writes them)
/// against a server in operator mode, whose account the test signs with an
/// operator key of its own: the broker publishes and a subscription (on its
/// own connection, with the same file) receives; a user the server does not
/// know is a configuration error, not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_file_authentication() -> anyhow::Result<()> {
    use base64::Engine as _;
    use broker_adapters::ErrorKind;
    use serde_json::json;

    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let jwt = |issuer: &nkeys::KeyPair, claims: serde_json::Value| -> anyhow::Result<String> {
        let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
        let body = b64(claims.to_string().as_bytes());
        let signature = issuer.sign(format!("{header}.{body}").as_bytes())?;
        Ok(format!("{header}.{body}.{}", b64(&signature)))
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let (operator, account) = (
        nkeys::KeyPair::new_operator(),
        nkeys::KeyPair::new_account(),
    );
    // JetStream in operator mode needs a system account.
    let system = nkeys::KeyPair::new_account();
    let unlimited = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let operator_jwt = jwt(
        &operator,
        json!({"jti": "operator", "iat": now, "iss": operator.public_key(),
               "sub": operator.public_key(), "name": "test operator",
               "nats": {"system_account": system.public_key(), "type": "operator", "version": 2}}),
    )?;
    let system_jwt = jwt(
        &operator,
        json!({"jti": "system", "iat": now, "iss": operator.public_key(),
               "sub": system.public_key(), "name": "SYS",
               "nats": {"type": "account", "version": 2}}),
    )?;
    let account_jwt = jwt(
        &operator,
        json!({"jti": "account", "iat": now, "iss": operator.public_key(),
               "sub": account.public_key(), "name": "app",
               "nats": {"limits": unlimited, "type": "account", "version": 2}}),
    )?;
    let creds = |signer: &nkeys::KeyPair, file: &Path| -> anyhow::Result<()> {
        let user = nkeys::KeyPair::new_user();
        let user_jwt = jwt(
            signer,
            json!({"jti": "user", "iat": now, "iss": signer.public_key(),
                   "sub": user.public_key(), "name": "app",
                   "nats": {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                            "type": "user", "version": 2}}),
        )?;
        let seed = user.seed()?;
        std::fs::write(
            file,
            format!(
                "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
                 -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
            ),
        )?;
        Ok(())
    };

    let dir = test_dir("e2e-nats-creds")?;
    let conf = dir.join("server.conf");
    std::fs::write(
        &conf,
        format!(
            "operator: {operator_jwt}\nsystem_account: {}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {}: {account_jwt}\n  {}: {system_jwt}\n}}\n",
            system.public_key(),
            account.public_key(),
            system.public_key()
        ),
    )?;
    let (mut server, port) =
        own_server(&dir, &["-c".to_owned(), conf.display().to_string()]).await?;
    let url = format!("nats://127.0.0.1:{port}");

    let good = dir.join("app.creds");
    creds(&account, &good)?;
    round_trip(
        config(0).url(&url).credentials_file(&good),
        "credentials file",
    )
    .await?;

    let stranger = dir.join("stranger.creds");
    creds(&nkeys::KeyPair::new_account(), &stranger)?;
    let err = NatsBroker::connect(config(0).url(&url).credentials_file(&stranger))
        .await
        .expect_err("a user of an account the server does not know");
    assert!(
        matches!(err.kind(), ErrorKind::Config { key, .. } if key == "credentials"),
        "{err:?}"
    );
    assert!(!err.is_retryable());

    server.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A NATS subscription whose server is gone (frozen with SIGSTOP, or
/// killed) does not hold up the service that closes or drops it: `close`
/// returns within a few request timeouts, and the runtime shuts down at
/// once.
#[test]
fn a_subscription_whose_server_is_gone_does_not_hold_up_shutdown() -> anyhow::Result<()> {
    let dir = test_dir("e2e-nats-gone")?;
    let starter = tokio::runtime::Runtime::new()?;
    let mut n = 0;
    let start = || {
        n += 1;
        let dir = dir.join(n.to_string());
        std::fs::create_dir_all(&dir)?;
        let (server, _) = starter.block_on(own_server(&dir, &[]))?;
        Ok(server)
    };
    let report = shutdown_is_not_held_up_by_a_gone_broker(
        start,
        connect_provisioned,
        Duration::from_secs(10),
    )?;
    for case in report {
        println!("{case:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A NATS server frozen (SIGSTOP) for 15 s under a running subscription
/// does not stall the subscription's runtime, and the subscription goes on
/// once the server answers again.
#[test]
fn a_server_frozen_under_a_subscription_does_not_stall_the_runtime() -> anyhow::Result<()> {
    let dir = test_dir("e2e-nats-freeze")?;
    let (server, _) = tokio::runtime::Runtime::new()?.block_on(own_server(&dir, &[]))?;
    a_frozen_broker_does_not_stall_a_running_subscription(
        &server,
        connect_provisioned,
        Duration::from_secs(15),
    )?;
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Connects with [`config`] and provisions a topic.
fn connect_provisioned(
    port: u16,
) -> futures_util::future::BoxFuture<'static, anyhow::Result<e2e::restart::Connected>> {
    Box::pin(async move {
        let broker = Arc::new(NatsBroker::connect(config(port)).await?);
        let topic = Topic::try_from("gone.events")?;
        broker.provision(&topic).await?;
        anyhow::Ok((broker.clone() as _, broker as _, topic))
    })
}
