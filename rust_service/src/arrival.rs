//! When a connection's first request reached the kernel, from which its request timeout
//! counts (docs/contract.md: "within `REQUEST_TIMEOUT_SECONDS` of its headers' arrival").
//!
//! A request that waited unread in the server's socket (the process stopped, or busy) has
//! used that time of its deadline already. The kernel says how long ago a connection last
//! received data (`TCP_INFO`'s `tcpi_last_data_recv`), and that answers for the data still
//! unread only before the first read: once a read has opened the receive window, the rest
//! of a body floods in and the answer is about 0. actix-web offers one hook before any
//! read, at the connection's start ([`remember`], for `HttpServer::on_connect`), so the
//! arrival is known for a connection's first request; a later request on it counts from
//! its parsing, which actix-web's threads, never busy with inference, do at once.

use std::any::Any;
use std::cell::Cell;
use std::time::{Duration, Instant};

use actix_web::dev::Extensions;
use actix_web::HttpRequest;

/// When the data waiting on a new connection arrived, kept with the connection until its
/// first request takes it.
struct FirstArrival(Cell<Option<Instant>>);

/// For `HttpServer::on_connect`: notes when the data already waiting on a new TCP connection
/// arrived, if any has.
pub fn remember(connection: &dyn Any, extensions: &mut Extensions) {
    #[cfg(target_os = "linux")]
    if let Some(stream) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
        use std::os::fd::AsRawFd;
        if let Some(ago) = waited(stream.as_raw_fd()) {
            let arrived = Instant::now().checked_sub(ago);
            extensions.insert(FirstArrival(Cell::new(arrived)));
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (connection, extensions);
}

/// When the headers of `req` arrived: for a connection's first request whose data had come
/// before the connection started, then; else now (they have just been parsed).
pub fn headers_arrived(req: &HttpRequest) -> Instant {
    arrived_by(req.conn_data::<FirstArrival>(), Instant::now())
}

fn arrived_by(first: Option<&FirstArrival>, now: Instant) -> Instant {
    first
        .and_then(|first| first.0.take())
        .map_or(now, |arrived| arrived.min(now))
}

/// How long the data waiting unread on the TCP socket `fd` has waited, at least (the newest
/// of it, to the kernel's clock tick); None when nothing waits or the kernel cannot say.
#[cfg(target_os = "linux")]
fn waited(fd: std::os::fd::RawFd) -> Option<Duration> {
    let mut unread: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which points at one.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) } != 0 || unread <= 0 {
        return None;
    }
    // SAFETY: tcp_info is plain integers, for which all zeros is a value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut size = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `size` bytes into `info`, which has that many.
    let status = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut size,
        )
    };
    let reaches = std::mem::offset_of!(libc::tcp_info, tcpi_last_data_recv) + 4;
    (status == 0 && size as usize >= reaches)
        .then(|| Duration::from_millis(info.tcpi_last_data_recv.into()))
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    use super::*;

    fn accepted_after(sent: &[u8], wait: Duration) -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        client.write_all(sent).unwrap();
        std::thread::sleep(wait);
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn data_waiting_since_before_the_accept_is_dated_to_its_arrival() {
        let (_client, server) =
            accepted_after(b"POST / HTTP/1.1\r\n\r\n", Duration::from_millis(300));
        let ago = waited(server.as_raw_fd()).expect("data waits");
        assert!(
            ago >= Duration::from_millis(250) && ago < Duration::from_secs(5),
            "{ago:?}"
        );
    }

    #[test]
    fn a_connection_with_nothing_sent_has_no_arrival() {
        let (_client, server) = accepted_after(b"", Duration::from_millis(50));
        assert_eq!(waited(server.as_raw_fd()), None);
    }

    #[test]
    fn the_arrival_is_the_first_requests_alone() {
        let now = Instant::now();
        let arrived = now - Duration::from_secs(1);
        let first = FirstArrival(Cell::new(Some(arrived)));
        assert_eq!(arrived_by(Some(&first), now), arrived);
        assert_eq!(
            arrived_by(Some(&first), now),
            now,
            "a later request counts from now"
        );
        assert_eq!(arrived_by(None, now), now);
    }
}
