//! An upload sent in two halves over a raw connection (an HTTP client sends a body whole): the
//! request head and the first half of a one-file form now, the rest when the test says.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct HalfSentUpload {
    stream: TcpStream,
    rest: Vec<u8>,
}

impl HalfSentUpload {
    /// Starts `POST /api/v1/images/upload` of `image` on `address` (`host:port`), with no
    /// credentials, and sends half of its body.
    pub async fn start(address: &str, filename: &str, image: &[u8]) -> Self {
        let body = [
            format!("--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n\r\n").as_bytes(),
            image,
            b"\r\n--B--\r\n",
        ]
        .concat();
        let mut stream = TcpStream::connect(address).await.unwrap();
        let head = format!(
            "POST /api/v1/images/upload HTTP/1.1\r\nHost: {address}\r\nContent-Type: multipart/form-data; boundary=B\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let (first, rest) = body.split_at(body.len() / 2);
        stream.write_all(first).await.unwrap();
        stream.flush().await.unwrap();
        Self { stream, rest: rest.to_vec() }
    }

    /// Sends the rest of the body; the whole response.
    pub async fn finish(mut self) -> String {
        self.stream.write_all(&self.rest).await.unwrap();
        let mut response = String::new();
        self.stream.read_to_string(&mut response).await.unwrap();
        response
    }
}
