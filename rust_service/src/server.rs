//! The HTTP server around the routes (http.rs): how it treats slow clients and how it
//! stops (docs/contract.md, "Under load, slow clients, shutdown").
//!
//! Stopping, on SIGTERM or SIGINT ([`signalled`]) or any other future given to [`bind`]:
//! /readyz answers 503 at once, then actix-web stops gracefully: it closes the listening
//! socket (new connections are refused), tells every connection to drain (a response still
//! to come carries `Connection: close`, an idle keep-alive connection is closed at once),
//! and lets the requests already received finish, for at most the graceful timeout. A
//! watchdog ([`exit_after`], which main.rs starts with the signal) makes that a bound on
//! the whole process, whatever actix-web's own timer, which only looks once a second, does.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{web, HttpServer};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::arrival;
use crate::http::{self, AppState};

/// How the server treats connections, from `Config::server_options`.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// HTTP threads; the same number as inference workers.
    pub workers: usize,
    /// From a connection's opening to the end of its first request's headers.
    pub header_timeout: Duration,
    /// From the stop signal to the process's exit, at most.
    pub graceful_timeout: Duration,
}

/// How long a kept-alive connection may stay idle (actix-web's default, set here to be
/// seen): the limit on the start of a later request's headers, since actix-http's header
/// timeout covers only a connection's first request.
const KEEP_ALIVE: Duration = Duration::from_secs(5);

/// How long actix-http keeps reading, and throwing away, what a client still sends after an
/// answer that closes the connection (a body refused past the discard limit, or too slow),
/// before it closes; and how long a closing connection waits for the client. Long enough
/// for a client still writing to see its answer, short enough that such connections do
/// not pile up.
const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Binds the server to `addr` and returns it, not yet running (await it on an actix
/// System), with the addresses bound. It stops gracefully once `stop` completes.
pub fn bind(
    state: web::Data<AppState>,
    options: &ServerOptions,
    addr: SocketAddr,
    stop: impl Future<Output = ()> + Send + 'static,
) -> io::Result<(Server, Vec<SocketAddr>)> {
    let ready = std::sync::Arc::clone(&state.ready);
    let graceful_timeout = options.graceful_timeout;
    let stopping = async move {
        stop.await;
        // Before actix-web stops accepting, so that no probe sees "ready" from now on.
        ready.store(false, Ordering::Release);
        tracing::info!(
            graceful_timeout_s = graceful_timeout.as_secs_f64(),
            "stopping: no longer ready, finishing the requests received"
        );
    };
    let server = HttpServer::new(move || http::app(state.clone()))
        .workers(options.workers)
        .keep_alive(KEEP_ALIVE)
        .client_request_timeout(options.header_timeout)
        .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
        // A client that closes its side is gone, not waiting for an answer: drop the
        // request then (its handler future, and with it the job's reply, so that a worker
        // skips the job) rather than compute an answer nobody reads.
        .h1_allow_half_closed(false)
        // When a connection's first request arrived, for its deadline (arrival.rs).
        .on_connect(arrival::remember)
        .shutdown_timeout(options.graceful_timeout.as_secs())
        .shutdown_signal(stopping)
        .bind(addr)?;
    let addrs = server.addrs();
    Ok((server.run(), addrs))
}

/// Ends the process `after` from now if it has not ended by itself: actix-web checks its
/// shutdown timeout only once a second and then waits a little more. main.rs starts it
/// when the stop signal comes.
pub fn exit_after(after: Duration) {
    let spawned = std::thread::Builder::new()
        .name("graceful-timeout".into())
        .spawn(move || {
            std::thread::sleep(after);
            tracing::warn!("graceful timeout: exiting with requests unfinished");
            std::process::exit(1);
        });
    if let Err(err) = spawned {
        tracing::error!("cannot start the graceful timeout's thread: {err}");
    }
}

/// Completes on the first SIGTERM (what Kubernetes and Docker send) or SIGINT (Ctrl-C).
/// A second one ends the process at once. Registers the handlers when first polled, which
/// must be on a Tokio runtime (the actix System running the server).
pub async fn signalled() {
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(err), _) | (_, Err(err)) => {
            // The default action of both signals, ending the process, stays in place.
            tracing::error!("cannot handle SIGTERM/SIGINT: {err}; they will kill the process");
            return std::future::pending().await;
        }
    };
    let first = next_signal(&mut term, &mut int).await;
    tracing::info!(signal = first, "stop signal received");
    actix_web::rt::spawn(async move {
        let second = next_signal(&mut term, &mut int).await;
        tracing::warn!(signal = second, "second stop signal: exiting now");
        std::process::exit(1);
    });
}

async fn next_signal(term: &mut Signal, int: &mut Signal) -> &'static str {
    std::future::poll_fn(|cx| {
        if term.poll_recv(cx).is_ready() {
            Poll::Ready("SIGTERM")
        } else if int.poll_recv(cx).is_ready() {
            Poll::Ready("SIGINT")
        } else {
            Poll::Pending
        }
    })
    .await
}

/// The server on 127.0.0.1, spoken to over real TCP connections, as clients do: what only
/// actix-http's connection handling decides (timeouts, keep-alive, closing, draining on
/// stop) together with the routes.
#[cfg(test)]
mod tests {
    use std::io::{ErrorKind, Read, Write};
    use std::net::TcpStream;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::thread::JoinHandle;
    use std::time::Instant;

    use super::*;
    use crate::error::AppError;
    use crate::http::testing::{state_with, LIMITS};
    use crate::http::Limits;
    use crate::infer::testing::{FakeModel, GateControl};
    use crate::infer::{Batching, Inferencer};

    const PHOTO: &[u8] = include_bytes!("../tests/fixtures/rgb_420.jpg");
    const MIB: usize = 1024 * 1024;

    const OPTIONS: ServerOptions = ServerOptions {
        workers: 1,
        header_timeout: Duration::from_secs(5),
        graceful_timeout: Duration::from_secs(10),
    };

    /// A running server; dropping it stops it.
    struct TestServer {
        addr: SocketAddr,
        state: web::Data<AppState>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        thread: Option<JoinHandle<io::Result<()>>>,
    }

    impl TestServer {
        fn start(state: web::Data<AppState>, options: ServerOptions) -> Self {
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let (addr_tx, addr_rx) = std::sync::mpsc::channel();
            let server_state = state.clone();
            let thread = std::thread::spawn(move || {
                actix_web::rt::System::new().block_on(async move {
                    let stop = async move {
                        let _ = stopped.await;
                    };
                    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
                    let (server, addrs) = bind(server_state, &options, addr, stop)?;
                    let _ = addr_tx.send(addrs[0]);
                    server.await
                })
            });
            let addr = addr_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the server started");
            Self {
                addr,
                state,
                stop: Some(stop),
                thread: Some(thread),
            }
        }

        fn connect(&self) -> TcpStream {
            let stream = TcpStream::connect(self.addr).expect("connect");
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            stream
                .set_write_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            stream
        }

        /// Signals the stop, as SIGTERM does in main.rs.
        fn signal_stop(&mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
        }

        /// Waits for the server to have stopped.
        fn join(&mut self) -> Duration {
            let started = Instant::now();
            if let Some(thread) = self.thread.take() {
                thread.join().expect("no panic").expect("server ran");
            }
            started.elapsed()
        }
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.signal_stop();
            if !std::thread::panicking() {
                self.join();
            }
        }
    }

    fn server(limits: Limits, capacity: usize, max_pending: usize) -> TestServer {
        let state = state_with(
            Inferencer::fake(Batching::OFF),
            limits,
            capacity,
            max_pending,
        );
        TestServer::start(state, OPTIONS)
    }

    /// A server whose one worker holds every image until the test lets it through.
    fn gated_server(limits: Limits, capacity: usize) -> (TestServer, GateControl) {
        let (model, gate) = FakeModel::gated();
        let inferencer = Inferencer::fake_with(model, Batching::OFF, limits.request_timeout);
        let state = state_with(inferencer, limits, capacity, 64 * MIB);
        (TestServer::start(state, OPTIONS), gate)
    }

    #[derive(Debug)]
    struct Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Response {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn closes(&self) -> bool {
            self.header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"))
        }

        fn error(&self) -> String {
            let json: serde_json::Value = serde_json::from_slice(&self.body)
                .unwrap_or_else(|err| panic!("{}: not JSON ({err}): {:?}", self.status, self));
            json["error"].as_str().expect("an error body").to_owned()
        }
    }

    /// Reads one response (with a Content-Length body, as every one here has), and not a
    /// byte more: its head a byte at a time.
    fn read_response(stream: &mut TcpStream) -> io::Result<Response> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte)? == 0 {
                return Err(io::Error::new(ErrorKind::UnexpectedEof, "closed"));
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).expect("an ASCII head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter(|line| !line.is_empty())
            .map(|line| {
                let (name, value) = line.split_once(':').expect("a header");
                (name.to_owned(), value.trim().to_owned())
            })
            .collect();
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map_or(0, |(_, v)| v.parse().expect("length"));
        let mut body = vec![0; length];
        stream.read_exact(&mut body)?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }

    fn head(method: &str, path: &str, headers: &[&str]) -> Vec<u8> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
        for header in headers {
            head.push_str(header);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        head.into_bytes()
    }

    /// `POST /predict/raw` with `body` as a PNG, whole.
    fn raw_request(body: &[u8]) -> Vec<u8> {
        let mut request = head(
            "POST",
            "/predict/raw",
            &[
                "Content-Type: image/png",
                &format!("Content-Length: {}", body.len()),
            ],
        );
        request.extend_from_slice(body);
        request
    }

    fn get(stream: &mut TcpStream, path: &str) -> io::Result<Response> {
        stream.write_all(&head("GET", path, &[]))?;
        read_response(stream)
    }

    /// Whether the server closed `stream` cleanly (EOF), rather than resetting it.
    fn closed_cleanly(stream: &mut TcpStream) -> bool {
        let mut rest = Vec::new();
        match stream.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(err) => {
                assert_ne!(err.kind(), ErrorKind::WouldBlock, "still open");
                false
            }
        }
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn one_request_beyond_the_places_and_the_line_gets_503_its_body_discarded() {
        let limits = Limits {
            max_body_bytes: 8 * MIB,
            discard_body_bytes: MIB,
            ..LIMITS
        };
        let (server, gate) = gated_server(limits, 1);
        let mut first = server.connect();
        first.write_all(&raw_request(PHOTO)).expect("send");
        gate.started
            .recv_timeout(Duration::from_secs(10))
            .expect("started");
        // The one place is taken: the next request waits in line for it.
        let mut waiting = server.connect();
        waiting.write_all(&raw_request(PHOTO)).expect("send");
        wait_for("one in line", || server.state.admission.waiting() == 1);

        // A body under the discard limit: read to its end, so the connection stays open.
        let mut second = server.connect();
        second.write_all(&raw_request(&[1; 300_000])).expect("send");
        let refused = read_response(&mut second).expect("answer");
        assert_eq!(refused.status, 503, "{refused:?}");
        assert_eq!(refused.error(), "the server is overloaded; retry later");
        assert_eq!(refused.header("retry-after"), Some("1"));
        assert!(!refused.closes(), "{refused:?}");
        assert_eq!(
            get(&mut second, "/livez").expect("same connection").status,
            200
        );

        // A body over it: answered after the first MiB, then the connection closes.
        let mut third = server.connect();
        let writer = {
            let mut third = third.try_clone().expect("clone");
            std::thread::spawn(move || third.write_all(&raw_request(&[1; 4 * MIB])))
        };
        let refused = read_response(&mut third).expect("answer");
        assert_eq!(refused.status, 503);
        assert!(refused.closes(), "{refused:?}");
        let _ = writer.join();

        gate.proceed.send(()).expect("let the first through");
        let served = read_response(&mut first).expect("answer");
        assert_eq!(served.status, 200, "{served:?}");
        // The one in line has the freed place.
        gate.started
            .recv_timeout(Duration::from_secs(10))
            .expect("the one in line started");
        gate.proceed.send(()).expect("let it through");
        let served = read_response(&mut waiting).expect("answer");
        assert_eq!(served.status, 200, "{served:?}");
        wait_for("every place back", || server.state.admission.held() == 0);
    }

    #[test]
    fn a_request_waiting_for_a_place_holds_its_client_back_until_it_has_one() {
        let limits = Limits {
            max_body_bytes: 16 * MIB,
            ..LIMITS
        };
        let server = server(limits, 1, 64 * MIB);
        let held = server.state.admission.try_admit().expect("the one place");
        let stream = server.connect();
        let written = Arc::new(AtomicUsize::new(0));
        let writer = {
            let mut stream = stream.try_clone().expect("clone");
            let written = Arc::clone(&written);
            std::thread::spawn(move || {
                for chunk in raw_request(&vec![0; 16 * MIB]).chunks(64 * 1024) {
                    stream.write_all(chunk)?;
                    written.fetch_add(chunk.len(), Ordering::Relaxed);
                }
                io::Result::Ok(())
            })
        };
        wait_for("the request to wait", || {
            server.state.admission.waiting() == 1
        });
        // The body is not read while the request waits: once actix-http's buffers and the
        // socket's are full, the client's writes block.
        std::thread::sleep(Duration::from_secs(1));
        let blocked_at = written.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(written.load(Ordering::Relaxed), blocked_at, "still writing");
        assert!(blocked_at < 16 * MIB, "the whole body was taken in");
        assert!(!writer.is_finished());
        assert_eq!(server.state.admission.pending_bytes(), 0);

        drop(held);
        writer.join().expect("no panic").expect("the body is read");
        let mut stream = stream;
        let answered = read_response(&mut stream).expect("answer");
        assert_eq!(
            answered.status, 400,
            "read, then not an image: {answered:?}"
        );
        assert_eq!(server.state.admission.held(), 0);
    }

    #[test]
    fn a_client_that_writes_20_mb_before_reading_reads_its_413() {
        let limits = Limits {
            max_body_bytes: 16 * MIB,
            discard_body_bytes: 64 * MIB,
            ..LIMITS
        };
        let server = server(limits, 64, 64 * MIB);
        let body = vec![0u8; 20 * 1000 * 1000];
        // Declared: refused at the headers, then the body is read and thrown away.
        let mut stream = server.connect();
        stream
            .write_all(&raw_request(&body))
            .expect("the whole body is read");
        let refused = read_response(&mut stream).expect("answer");
        assert_eq!(refused.status, 413, "{refused:?}");
        assert_eq!(
            refused.error(),
            "request body is larger than 16777216 bytes"
        );
        assert!(
            !refused.closes(),
            "the body was read to its end: {refused:?}"
        );
        assert_eq!(
            get(&mut stream, "/livez").expect("same connection").status,
            200
        );

        // Chunked: refused once counted over the limit, the rest thrown away too.
        let mut stream = server.connect();
        let mut request = head(
            "POST",
            "/predict/raw",
            &["Content-Type: image/png", "Transfer-Encoding: chunked"],
        );
        for chunk in body.chunks(MIB) {
            request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
            request.extend_from_slice(chunk);
            request.extend_from_slice(b"\r\n");
        }
        request.extend_from_slice(b"0\r\n\r\n");
        stream.write_all(&request).expect("the whole body is read");
        let refused = read_response(&mut stream).expect("answer");
        assert_eq!(refused.status, 413, "{refused:?}");
        assert!(!refused.closes(), "{refused:?}");
        assert_eq!(
            get(&mut stream, "/livez").expect("same connection").status,
            200
        );
    }

    #[test]
    fn a_client_that_expects_100_continue_is_answered_before_it_sends_its_body() {
        let server = server(LIMITS, 64, MIB);
        let mut stream = server.connect();
        stream
            .write_all(&head(
                "POST",
                "/predict/raw",
                &[
                    "Content-Type: image/png",
                    "Content-Length: 20000000",
                    "Expect: 100-continue",
                ],
            ))
            .expect("send");
        // actix-http says `100 Continue` before any handler runs; the refusal follows at
        // once, without waiting for the body, and closes the connection.
        let interim = read_response(&mut stream).expect("100");
        assert_eq!(interim.status, 100, "{interim:?}");
        let refused = read_response(&mut stream).expect("answer");
        assert_eq!(refused.status, 413, "{refused:?}");
        assert!(refused.closes(), "{refused:?}");
    }

    #[test]
    fn slow_headers_get_408_from_actix() {
        let options = ServerOptions {
            header_timeout: Duration::from_secs(1),
            ..OPTIONS
        };
        let state = state_with(Inferencer::fake(Batching::OFF), LIMITS, 8, MIB);
        let server = TestServer::start(state, options);
        let mut stream = server.connect();
        let started = Instant::now();
        stream
            .write_all(b"POST /predict HTTP/1.1\r\nHost: test\r\n")
            .expect("send");
        let timed_out = read_response(&mut stream).expect("answer");
        let waited = started.elapsed();
        assert_eq!(timed_out.status, 408, "{timed_out:?}");
        // actix-http writes this one itself, with no body.
        assert!(timed_out.body.is_empty(), "{timed_out:?}");
        assert!(waited >= Duration::from_millis(900), "after {waited:?}");
        assert!(waited < Duration::from_secs(4), "after {waited:?}");
        assert!(closed_cleanly(&mut stream));
    }

    #[test]
    fn a_slow_body_gets_408_json_and_gives_back_its_place_and_bytes() {
        let limits = Limits {
            body_timeout: Duration::from_secs(1),
            ..LIMITS
        };
        let server = server(limits, 8, MIB);
        let mut stream = server.connect();
        let started = Instant::now();
        let mut request = head(
            "POST",
            "/predict/raw",
            &["Content-Type: image/png", "Content-Length: 50000"],
        );
        request.extend_from_slice(&[0; 1000]);
        stream.write_all(&request).expect("send");
        let timed_out = read_response(&mut stream).expect("answer");
        let waited = started.elapsed();
        assert_eq!(timed_out.status, 408, "{timed_out:?}");
        assert_eq!(
            timed_out.error(),
            "the request body did not arrive within 1s of its headers"
        );
        assert!(timed_out.closes(), "{timed_out:?}");
        assert!(waited >= Duration::from_millis(900), "after {waited:?}");
        assert!(waited < Duration::from_secs(4), "after {waited:?}");
        assert_eq!(server.state.admission.held(), 0);
        assert_eq!(server.state.admission.pending_bytes(), 0);
    }

    #[test]
    fn stalled_bodies_cannot_reserve_more_than_the_budget() {
        let limits = Limits {
            max_body_bytes: 16 * MIB,
            discard_body_bytes: 64 * MIB,
            body_timeout: Duration::from_secs(2),
            ..LIMITS
        };
        // Room for 3 declared bodies of 16 MiB.
        let server = server(limits, 64, 48 * MIB);
        let stall = |stream: &mut TcpStream| {
            let mut request = head(
                "POST",
                "/predict/raw",
                &["Content-Type: image/png", "Content-Length: 16777216"],
            );
            request.extend_from_slice(&vec![0; 15 * MIB]);
            stream.write_all(&request)
        };
        let mut stalled: Vec<TcpStream> = (0..3).map(|_| server.connect()).collect();
        for stream in &mut stalled {
            stall(stream).expect("taken in");
        }
        wait_for("three bodies arriving", || {
            server.state.admission.pending_bytes() == 48 * MIB
        });
        // Refused at its headers: its body is read and thrown away, not held.
        let mut fourth = server.connect();
        fourth
            .write_all(&raw_request(&vec![0; 16 * MIB]))
            .expect("read");
        let refused = read_response(&mut fourth).expect("answer");
        assert_eq!(refused.status, 503, "{refused:?}");
        assert_eq!(refused.error(), AppError::TooManyBodiesArriving.to_string());
        assert!(!refused.closes(), "{refused:?}");
        assert_eq!(
            server.state.admission.pending_bytes(),
            48 * MIB,
            "answered while the three still stall"
        );
        for stream in &mut stalled {
            assert_eq!(read_response(stream).expect("answer").status, 408);
        }
        assert_eq!(server.state.admission.pending_bytes(), 0);
        let mut fifth = server.connect();
        fifth.write_all(&raw_request(PHOTO)).expect("send");
        assert_eq!(read_response(&mut fifth).expect("answer").status, 200);
    }

    #[test]
    fn a_request_whose_client_is_gone_is_never_run() {
        let (server, gate) = gated_server(LIMITS, 8);
        let mut first = server.connect();
        first.write_all(&raw_request(PHOTO)).expect("send");
        gate.started
            .recv_timeout(Duration::from_secs(10))
            .expect("started");
        let gone = server.connect();
        (&gone).write_all(&raw_request(PHOTO)).expect("send");
        wait_for("the second to be held", || {
            server.state.admission.held() == 2
        });
        drop(gone);
        // actix-http notices the close and drops the request, which frees its place.
        wait_for("the second to be dropped", || {
            server.state.admission.held() == 1
        });
        gate.proceed.send(()).expect("let the first through");
        assert_eq!(read_response(&mut first).expect("answer").status, 200);
        // A third request shows the worker is past the second's job without starting it.
        let mut third = server.connect();
        third.write_all(&raw_request(PHOTO)).expect("send");
        gate.started
            .recv_timeout(Duration::from_secs(10))
            .expect("the third started");
        gate.proceed.send(()).expect("let the third through");
        assert_eq!(read_response(&mut third).expect("answer").status, 200);
        assert!(gate.started.try_recv().is_err(), "the second never started");
    }

    #[test]
    fn a_request_whose_client_is_gone_while_it_waits_leaves_the_line() {
        let server = server(LIMITS, 1, MIB);
        let held = server.state.admission.try_admit().expect("the one place");
        let gone = server.connect();
        (&gone).write_all(&raw_request(PHOTO)).expect("send");
        wait_for("the request to wait", || {
            server.state.admission.waiting() == 1
        });
        drop(gone);
        // actix-http notices the close (a body this small is read into its buffer, so it
        // still reads the connection) and drops the request.
        wait_for("the request to leave the line", || {
            server.state.admission.waiting() == 0
        });
        let counted =
            r#"bentoml_service_request_total{endpoint="/predict/raw",http_response_code="503""#;
        wait_for("the request to be counted as a 503", || {
            server.state.metrics.render().contains(counted)
        });
        drop(held);
        assert!(
            server.state.admission.try_admit().is_some(),
            "no place kept"
        );
    }

    #[test]
    fn stopping_finishes_requests_in_flight_closes_idle_connections_and_the_port() {
        let (mut server, gate) = gated_server(LIMITS, 8);
        let mut in_flight = server.connect();
        in_flight.write_all(&raw_request(PHOTO)).expect("send");
        gate.started
            .recv_timeout(Duration::from_secs(10))
            .expect("started");
        let mut idle = server.connect();
        assert_eq!(get(&mut idle, "/readyz").expect("ready").status, 200);

        server.signal_stop();
        wait_for("not ready", || !server.state.ready.load(Ordering::Acquire));
        // The idle keep-alive connection is closed, not reset.
        assert!(closed_cleanly(&mut idle), "the idle connection was reset");
        // The port is closed: new connections are refused, not accepted and dropped.
        wait_for("the port to close", || {
            TcpStream::connect(server.addr)
                .is_err_and(|err| err.kind() == ErrorKind::ConnectionRefused)
        });
        // The request in flight is answered, with `Connection: close`.
        gate.proceed.send(()).expect("let it through");
        let answered = read_response(&mut in_flight).expect("answer");
        assert_eq!(answered.status, 200, "{answered:?}");
        assert!(answered.closes(), "{answered:?}");
        assert!(closed_cleanly(&mut in_flight));
        let stopped = server.join();
        assert!(
            stopped < Duration::from_secs(5),
            "stopped after {stopped:?}"
        );
    }

    #[test]
    fn a_refused_chunked_body_past_the_discard_limit_is_not_read_on_and_on() {
        // actix-http would read a chunked body nobody reads to its end, however long it
        // takes; the refusal closes the connection instead, after a short linger.
        let server = server(LIMITS, 0, MIB);
        let mut stream = server.connect();
        let mut request = head(
            "POST",
            "/predict/raw",
            &["Content-Type: image/png", "Transfer-Encoding: chunked"],
        );
        for _ in 0..3 {
            request.extend_from_slice(format!("{:x}\r\n", MIB).as_bytes());
            request.extend_from_slice(&vec![0; MIB]);
            request.extend_from_slice(b"\r\n");
        }
        // No last chunk: the body goes on, as far as the server knows.
        stream.write_all(&request).expect("send");
        let refused = read_response(&mut stream).expect("answer");
        assert_eq!(refused.status, 503, "{refused:?}");
        assert!(refused.closes(), "{refused:?}");
        let started = Instant::now();
        let mut rest = Vec::new();
        let end = stream.read_to_end(&mut rest);
        assert!(
            end.as_ref()
                .map_or_else(|err| err.kind() != ErrorKind::WouldBlock, |_| true),
            "still open after {:?}: {end:?}",
            started.elapsed()
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    fn chunked(body: &[u8]) -> Vec<u8> {
        let mut request = head(
            "POST",
            "/predict/raw",
            &["Content-Type: image/png", "Transfer-Encoding: chunked"],
        );
        request.extend_from_slice(body);
        request
    }

    fn with_headers(headers: &[&str]) -> Vec<u8> {
        let mut all = vec!["Content-Type: image/png"];
        all.extend_from_slice(headers);
        head("POST", "/predict/raw", &all)
    }

    /// The contract's table of HTTP-layer errors. Where actix-http refuses the request
    /// before any handler runs, it writes the response itself: the status, an empty body
    /// and `Connection: close`. The rest are ours, with a JSON body.
    #[test]
    fn http_layer_errors_get_the_contracts_status() {
        let server = server(LIMITS, 8, MIB);
        let many_headers: Vec<String> = (0..100).map(|i| format!("X-H{i}: v")).collect();
        let many_headers: Vec<&str> = many_headers.iter().map(String::as_str).collect();
        let big_header = format!("X-Big: {}", "a".repeat(200_000));
        let cases: Vec<(&str, Vec<u8>, u16, bool)> = vec![
            // (what, request, status, whether the body is ours, JSON)
            (
                "Content-Length: abc",
                with_headers(&["Content-Length: abc"]),
                400,
                false,
            ),
            (
                "Content-Length: 2^80",
                with_headers(&["Content-Length: 1208925819614629174706176"]),
                400,
                false,
            ),
            (
                "Content-Length: +5",
                with_headers(&["Content-Length: +5"]),
                400,
                false,
            ),
            (
                "Content-Length: 2^63",
                with_headers(&["Content-Length: 9223372036854775808"]),
                400,
                true,
            ),
            (
                "Content-Length: 2^64-1",
                with_headers(&["Content-Length: 18446744073709551615"]),
                400,
                true,
            ),
            (
                "two Content-Lengths",
                with_headers(&["Content-Length: 5", "Content-Length: 6"]),
                400,
                false,
            ),
            (
                "Content-Length and chunked",
                with_headers(&["Content-Length: 5", "Transfer-Encoding: chunked"]),
                400,
                false,
            ),
            (
                "a chunk size of 2^80",
                chunked(b"100000000000000000000\r\n"),
                400,
                true,
            ),
            (
                "a chunk size that is not hex",
                chunked(b"xyz\r\nabc\r\n"),
                400,
                true,
            ),
            (
                "a chunk without its CRLF",
                chunked(b"3\r\nabcXX"),
                400,
                true,
            ),
            (
                "a malformed request line",
                b"POST /predict/raw HTTP/1.1 x\r\nHost: t\r\n\r\n".to_vec(),
                400,
                false,
            ),
            (
                "a malformed header",
                b"GET /livez HTTP/1.1\r\nHost: t\r\nBad Name: y\r\n\r\n".to_vec(),
                400,
                false,
            ),
            (
                "100 headers",
                head("GET", "/livez", &many_headers),
                431,
                false,
            ),
            (
                "a 200 KB header",
                head("GET", "/livez", &[&big_header]),
                431,
                false,
            ),
        ];
        for (what, request, status, ours) in cases {
            let mut stream = server.connect();
            // A refusal must come at once, not after some timeout.
            stream
                .set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            stream.write_all(&request).expect("send");
            let response = read_response(&mut stream).unwrap_or_else(|err| panic!("{what}: {err}"));
            assert_eq!(response.status, status, "{what}: {response:?}");
            if ours {
                assert!(!response.error().is_empty(), "{what}");
            } else {
                assert!(response.body.is_empty(), "{what}: {response:?}");
                assert!(response.closes(), "{what}: {response:?}");
            }
        }
    }
}
