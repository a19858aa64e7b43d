//! [`Ganache`]: a real Ethereum node (the npm package `ganache`) on 127.0.0.1, for tests of
//! `eth_subscribe` pushes (`newHeads`, `logs`) from an upstream we did not write.
//!
//! Where ganache comes from: `.ci/run` installs it with npm into `target/ganache` (pinned to
//! [`GANACHE_VERSION`]) and exports `RPCGATE_GANACHE`, the path of its bin script. Without that
//! variable [`Ganache::start`] panics with a message naming `.ci/run`: a test that needs ganache
//! fails, it never passes by skipping.
//!
//! How it listens on a free port: ganache's CLI rejects `--server.port 0` ("Invalid port number
//! '0'"), and picking a free port ourselves and handing it over races with every other test that
//! binds one. Its library API does accept port 0 (`server.listen(0, host)` binds an ephemeral
//! port, and `server.address().port` tells which), so we do not run the bin script: `node` runs
//! [`LAUNCHER`], a few lines that `require` the ganache package found next to that bin script,
//! listen on 127.0.0.1 port 0 and print `LISTENING <port>`, the same handshake as
//! tests/interop/upstream.py. No port is ever guessed, so nothing has to be retried.
//!
//! The chain: deterministic wallet (`--wallet.deterministic`: the same ten funded accounts every
//! run, [`Ganache::account`] is the first), quiet logging, and the miner stopped (`miner_stop`)
//! once started, so a block, and with it a `newHeads` notification, comes only from
//! [`Ganache::mine`] (`evm_mine` mines whether or not the miner runs) or from
//! [`Ganache::emit_log`], which mines the block holding its transaction. A transaction sent by a
//! test (through the gateway, say) stays pending until the next `mine()`. At start one block is
//! mined (block 1) to deploy [`LOG_CONTRACT_INIT_CODE`], the contract `emit_log` calls.
//!
//! The process is killed when the [`Ganache`] is dropped; its stdin closing (the test process
//! died) also ends it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{with_timeout, with_timeout_of};

/// The version `.ci/run` installs; [`Ganache::start`] checks the installed package against it.
pub const GANACHE_VERSION: &str = "7.9.2";

/// The environment variable `.ci/run` exports: the path of ganache's bin script
/// (`target/ganache/node_modules/.bin/ganache`).
pub const GANACHE_ENV: &str = "RPCGATE_GANACHE";

/// How long ganache may take to start and deploy its contract: node loads a large bundle, which on
/// a busy 2-core CI machine running many test binaries at once can take several seconds.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Run by `node -e`; the ganache package directory comes in `RPCGATE_GANACHE_PACKAGE`.
const LAUNCHER: &str = r#"
"use strict";
const ganache = require(process.env.RPCGATE_GANACHE_PACKAGE);
const server = ganache.server({
  logging: { quiet: true },
  wallet: { deterministic: true },
});
server.listen(0, "127.0.0.1").then(
  () => process.stdout.write(`LISTENING ${server.address().port}\n`),
  (err) => {
    process.stderr.write(`ganache did not start: ${(err && err.stack) || err}\n`);
    process.exit(1);
  },
);
// Exit when the test process (the write end of our stdin) goes away.
process.stdin.on("data", () => {});
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
"#;

/// Init code of the contract [`Ganache::emit_log`] calls, hand-assembled (no Solidity). Its
/// runtime code, 17 bytes, emits one LOG1 per call: topic = the first 32 bytes of the calldata,
/// data = the rest. So calldata must be at least 32 bytes (shorter underflows the size and the
/// call runs out of gas).
///
/// ```text
/// init (11 bytes): copy the runtime code (at offset 0x0b, 0x11 bytes) to memory and return it
///   60 11     PUSH1 0x11       size
///   80        DUP1
///   60 0b     PUSH1 0x0b       offset of the runtime code in this code
///   60 00     PUSH1 0          memory offset
///   39        CODECOPY         mem[0..0x11] = code[0x0b..0x1c]
///   60 00     PUSH1 0
///   f3        RETURN           return mem[0..0x11]
/// runtime (17 bytes):
///   60 00 35  PUSH1 0 CALLDATALOAD           topic = calldata[0..32]
///   60 20 36  PUSH1 0x20 CALLDATASIZE
///   03        SUB                            size = calldatasize - 32
///   80        DUP1
///   60 20     PUSH1 0x20
///   60 00     PUSH1 0
///   37        CALLDATACOPY                   mem[0..size] = calldata[32..]
///   60 00     PUSH1 0
///   a1        LOG1                           log(mem[0..size], topic)
///   00        STOP
/// ```
pub const LOG_CONTRACT_INIT_CODE: &str =
    "0x601180600b6000396000f3600035602036038060206000376000a100";

/// A log emitted by [`Ganache::emit_log`], as its transaction's receipt reports it.
#[derive(Clone, Debug)]
pub struct EmittedLog {
    /// The block [`Ganache::emit_log`] mined for it.
    pub block_number: u64,
    /// `0x`-prefixed transaction hash.
    pub transaction_hash: String,
    /// The log object from `eth_getTransactionReceipt` (`address`, `topics`, `data`,
    /// `blockNumber`, `blockHash`, `transactionHash`, `logIndex`, ...); a `logs` subscription's
    /// notification carries the same fields in `params.result`.
    pub log: Value,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The harness's own WebSocket connection to ganache, for `mine`, `emit_log` and `call`.
struct Control {
    ws: Ws,
    next_id: u64,
}

// Each method runs under the one lock on the connection, so `mine` (two calls) and `transact`
// (four) are not interleaved with another task's: one emit_log, one block of its own.
impl Control {
    async fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        let id = self.next_id;
        self.next_id += 1;
        let request = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
        with_timeout(self.ws.send(Message::text(request.to_string())))
            .await
            .unwrap_or_else(|e| panic!("send {method} to ganache: {e}"));
        loop {
            let message = with_timeout(self.ws.next())
                .await
                .unwrap_or_else(|| panic!("ganache closed the connection during {method}"))
                .unwrap_or_else(|e| panic!("read ganache's reply to {method}: {e}"));
            let text = match message {
                Message::Text(text) => text.as_str().to_owned(),
                Message::Binary(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                _ => continue,
            };
            let mut reply: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
                panic!("ganache's reply to {method} is not JSON ({e}): {text}")
            });
            // Nothing subscribes on this connection, so nothing else should come; skip it if it does.
            if reply["id"] != id {
                continue;
            }
            return match reply.get_mut("error") {
                Some(error) => Err(error.take()),
                None => Ok(reply["result"].take()),
            };
        }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .await
            .unwrap_or_else(|e| panic!("ganache {method}: {e}"))
    }

    async fn block_number(&mut self) -> u64 {
        parse_quantity(&self.call("eth_blockNumber", json!([])).await)
    }

    async fn mine(&mut self) -> u64 {
        assert_eq!(self.call("evm_mine", json!([])).await, "0x0");
        self.block_number().await
    }

    /// `eth_sendTransaction`, `evm_mine`, then the receipt, which must say it succeeded.
    async fn transact(&mut self, tx: Value) -> Value {
        let hash = self.call("eth_sendTransaction", json!([tx])).await;
        self.mine().await;
        let receipt = self.call("eth_getTransactionReceipt", json!([hash])).await;
        assert_eq!(
            receipt["status"], "0x1",
            "transaction {tx} failed: {receipt}"
        );
        receipt
    }
}

/// A ganache process on 127.0.0.1; killed when dropped. See the module docs.
pub struct Ganache {
    child: Child,
    port: u16,
    control: Mutex<Control>,
    account: String,
    log_contract: String,
}

impl Ganache {
    /// Starts ganache on a free port and waits until it answers `eth_blockNumber` over WebSocket,
    /// has stopped its miner and has deployed the log contract (block 1). Panics, naming `.ci/run`,
    /// if `RPCGATE_GANACHE` is not set or does not lead to ganache [`GANACHE_VERSION`].
    pub async fn start() -> Ganache {
        let package = ganache_package(std::env::var_os(GANACHE_ENV).or_else(installed_by_ci))
            .unwrap_or_else(|e| panic!("{e}"));
        let mut child = Command::new("node")
            .args(["-e", LAUNCHER])
            .env("RPCGATE_GANACHE_PACKAGE", &package)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run `node` for ganache ({e}); .ci/run installs Node.js and ganache")
            });
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        let read = with_timeout_of(START_TIMEOUT, stdout.read_line(&mut line))
            .await
            .expect("read ganache's LISTENING line");
        if read == 0 {
            let status = with_timeout(child.wait()).await;
            panic!("ganache exited before listening ({status:?}); its stderr is above");
        }
        let port: u16 = line
            .trim()
            .strip_prefix("LISTENING ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the ganache launcher: {line:?}"));
        // Anything ganache prints later goes to the test's stderr (captured by the test harness)
        // instead of filling a pipe nobody reads.
        tokio::spawn(async move {
            let mut lines = stdout.lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("ganache: {line}");
            }
        });

        let (ws, _) = with_timeout(tokio_tungstenite::connect_async(format!(
            "ws://127.0.0.1:{port}/"
        )))
        .await
        .unwrap_or_else(|e| panic!("connect to ganache on port {port}: {e}"));
        let mut ganache = Ganache {
            child,
            port,
            control: Mutex::new(Control { ws, next_id: 1 }),
            account: String::new(),
            log_contract: String::new(),
        };
        with_timeout_of(START_TIMEOUT, ganache.prepare()).await;
        ganache
    }

    async fn prepare(&mut self) {
        let control = self.control.get_mut();
        let block = control.call("eth_blockNumber", json!([])).await;
        assert_eq!(block, "0x0", "a new ganache chain starts at block 0");
        assert_eq!(control.call("miner_stop", json!([])).await, true);
        let accounts = control.call("eth_accounts", json!([])).await;
        self.account = accounts[0]
            .as_str()
            .unwrap_or_else(|| panic!("eth_accounts: {accounts}"))
            .to_owned();
        let deploy = json!({"from": self.account, "data": LOG_CONTRACT_INIT_CODE});
        let receipt = control.transact(deploy).await;
        self.log_contract = receipt["contractAddress"]
            .as_str()
            .unwrap_or_else(|| panic!("no contractAddress in {receipt}"))
            .to_owned();
    }

    /// `ws://127.0.0.1:PORT/`, ganache's WebSocket JSON-RPC endpoint.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/", self.port)
    }

    /// `http://127.0.0.1:PORT/`: the same port also serves JSON-RPC over HTTP POST.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The first deterministic account (`0x90f8bf6a479f320ead074411a4b0e7944ea8c9c1`), funded
    /// and unlocked: `eth_sendTransaction` from it needs no signing.
    pub fn account(&self) -> &str {
        &self.account
    }

    /// Address (lowercase `0x` hex) of the contract [`Self::emit_log`] calls, for a `logs`
    /// subscription's `address` filter.
    pub fn log_contract(&self) -> &str {
        &self.log_contract
    }

    /// Calls `method` over the harness's own connection; its result, or `Err` with the error
    /// object.
    pub async fn try_call(&self, method: &str, params: Value) -> Result<Value, Value> {
        self.control.lock().await.try_call(method, params).await
    }

    /// [`Self::try_call`], panicking on an error reply.
    pub async fn call(&self, method: &str, params: Value) -> Value {
        self.control.lock().await.call(method, params).await
    }

    /// The current block number (`eth_blockNumber`).
    pub async fn block_number(&self) -> u64 {
        self.control.lock().await.block_number().await
    }

    /// Mines one block (`evm_mine`, with any pending transactions) and returns its number. The
    /// `newHeads` notifications for it may arrive after this returns: wait for them.
    pub async fn mine(&self) -> u64 {
        self.control.lock().await.mine().await
    }

    /// Sends a transaction from [`Self::account`] to the log contract and mines it: one log with
    /// `topics == [topic]` and `data == data` from [`Self::log_contract`], in a new block of its
    /// own (so `newHeads` subscribers see a block too). Returns the log as the receipt reports
    /// it; its `logs` notification may arrive after this returns.
    pub async fn emit_log(&self, topic: [u8; 32], data: &[u8]) -> EmittedLog {
        let mut calldata = topic.to_vec();
        calldata.extend_from_slice(data);
        let tx = json!({"from": self.account, "to": self.log_contract, "data": hex(&calldata)});
        let receipt = self.control.lock().await.transact(tx).await;
        let logs = receipt["logs"].as_array().cloned().unwrap_or_default();
        assert_eq!(logs.len(), 1, "one log expected in {receipt}");
        EmittedLog {
            block_number: parse_quantity(&receipt["blockNumber"]),
            transaction_hash: receipt["transactionHash"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            log: logs.into_iter().next().expect("one log"),
        }
    }

    /// Kills ganache now (a dying upstream); dropping the [`Ganache`] does the same.
    pub async fn kill(&mut self) {
        with_timeout(self.child.kill()).await.expect("kill ganache");
    }
}

/// The ganache package directory (the one holding its package.json) from the value of
/// `RPCGATE_GANACHE`, the path of its bin script; `Err` says what is wrong and how to fix it.
/// Where `.ci/run` installs ganache, when that has been run once: `cargo test` then
/// finds it without the variable.
fn installed_by_ci() -> Option<std::ffi::OsString> {
    let bin =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ganache/node_modules/.bin/ganache");
    bin.exists().then(|| bin.into_os_string())
}

pub fn ganache_package(bin: Option<std::ffi::OsString>) -> Result<PathBuf, String> {
    let install = format!(
        "`.ci/run` installs ganache {GANACHE_VERSION} and exports {GANACHE_ENV}; without running all \
         of it: npm install --prefix target/ganache --no-audit --no-fund ganache@{GANACHE_VERSION} \
         && export {GANACHE_ENV}=$PWD/target/ganache/node_modules/.bin/ganache"
    );
    let Some(bin) = bin else {
        return Err(format!(
            "{GANACHE_ENV} is not set, so these tests cannot run ganache. {install}"
        ));
    };
    let bin = PathBuf::from(bin);
    // The bin script is a symlink into the package (node_modules/ganache/dist/node/cli.js).
    let real = std::fs::canonicalize(&bin)
        .map_err(|e| format!("{GANACHE_ENV}={}: {e}. {install}", bin.display()))?;
    let package = real
        .ancestors()
        .skip(1)
        .find(|dir| is_ganache_package(dir))
        .ok_or_else(|| {
            format!(
                "{GANACHE_ENV}={} is not inside a ganache package. {install}",
                bin.display()
            )
        })?;
    let manifest: Value = std::fs::read(package.join("package.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default();
    if manifest["version"] != GANACHE_VERSION {
        return Err(format!(
            "{GANACHE_ENV}={} is ganache {}, the tests expect {GANACHE_VERSION}. {install}",
            bin.display(),
            manifest["version"]
        ));
    }
    Ok(package.to_owned())
}

fn is_ganache_package(dir: &Path) -> bool {
    std::fs::read(dir.join("package.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
        .is_some_and(|manifest| manifest["name"] == "ganache")
}

/// `0x`-prefixed lowercase hex, as Ethereum JSON-RPC writes data.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + 2 * bytes.len());
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// An Ethereum JSON-RPC quantity (`"0x1a"`) as a number.
pub fn parse_quantity(value: &Value) -> u64 {
    value
        .as_str()
        .and_then(|s| s.strip_prefix("0x"))
        .and_then(|s| u64::from_str_radix(s, 16).ok())
        .unwrap_or_else(|| panic!("not a quantity: {value}"))
}
