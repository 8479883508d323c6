//! A real S3 server (s3s + s3s-fs) for the benchmark: `s3-server ROOT PORT [ACCESS_KEY SECRET_KEY]`.
//! Binds 127.0.0.1 only and sets TCP_NODELAY (the stock s3s-fs binary does not, which stalls
//! keep-alive loopback runs by ~40 ms a request).

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use s3s::service::S3ServiceBuilder;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 && args.len() != 5 {
        eprintln!("usage: s3-server ROOT PORT [ACCESS_KEY SECRET_KEY]");
        std::process::exit(2);
    }
    let fs = s3s_fs::FileSystem::new(&args[1]).expect("root directory");
    let mut builder = S3ServiceBuilder::new(fs);
    if args.len() == 5 {
        builder.set_auth(s3s::auth::SimpleAuth::from_single(
            args[3].clone(),
            args[4].clone(),
        ));
    }
    let service = builder.build();
    let listener =
        tokio::net::TcpListener::bind(("127.0.0.1", args[2].parse::<u16>().expect("port")))
            .await
            .expect("bind");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
