//! The command table: every command and subcommand the scripts call, with Redis's arity for
//! each, and the dispatch of a call to it by name, with Redis's errors for unknown commands
//! and wrong argument counts.

use bytes::Bytes;

use super::{arity_error, is, text_128, Keyspace, Resp, Result};

const NO_ARGUMENTS: &str = "ERR Please specify at least one argument for this redis lib call";

type Handler = fn(&mut Keyspace, &[Bytes]) -> Result<Resp>;

/// One supported command: its name, Redis's arity (negative: at least that many arguments,
/// the name included) and what runs it.
struct Command {
    name: &'static str,
    arity: i32,
    run: Run,
}

/// What a command runs.
enum Run {
    Handler(Handler),
    /// A container command of Redis 7 (`XGROUP`, `XINFO`): its first argument names the
    /// subcommand to run, sorted by name (a unit test checks the order).
    Container(&'static [Subcommand]),
}

/// A subcommand of a container command. Its arity counts the command's and its own name.
struct Subcommand {
    name: &'static str,
    arity: i32,
    run: Handler,
}

const fn command(name: &'static str, arity: i32, run: Handler) -> Command {
    Command {
        name,
        arity,
        run: Run::Handler(run),
    }
}

const fn container(name: &'static str, arity: i32, subcommands: &'static [Subcommand]) -> Command {
    Command {
        name,
        arity,
        run: Run::Container(subcommands),
    }
}

const fn subcommand(name: &'static str, arity: i32, run: Handler) -> Subcommand {
    Subcommand { name, arity, run }
}

/// Every supported command, sorted by name for binary search (a unit test checks the order).
/// Exactly the commands and subcommands `lua/` calls: `tests/lua_commands.rs` checks both ways.
const COMMANDS: &[Command] = &[
    command("DEL", -2, Keyspace::del),
    command("EXISTS", -2, Keyspace::exists),
    command("HDEL", -3, Keyspace::hdel),
    command("HEXISTS", 3, Keyspace::hexists),
    command("HGET", 3, Keyspace::hget),
    command("HGETALL", 2, Keyspace::hgetall),
    command("HINCRBY", 4, Keyspace::hincrby),
    command("HMGET", -3, Keyspace::hmget),
    command("HSET", -4, Keyspace::hset),
    command("HSETNX", 4, Keyspace::hsetnx),
    command("LPOP", -2, Keyspace::lpop),
    command("LPUSH", -3, Keyspace::lpush),
    command("PEXPIRE", -3, Keyspace::pexpire),
    command("RPUSH", -3, Keyspace::rpush),
    command("SADD", -3, Keyspace::sadd),
    command("SMEMBERS", 2, Keyspace::smembers),
    command("TIME", 1, Keyspace::time),
    command("XACK", -4, Keyspace::xack),
    command("XADD", -5, Keyspace::xadd),
    command("XAUTOCLAIM", -6, Keyspace::xautoclaim),
    container(
        "XGROUP",
        -2,
        &[
            subcommand("CREATE", -5, Keyspace::xgroup_create),
            subcommand("DELCONSUMER", 5, Keyspace::xgroup_delconsumer),
        ],
    ),
    container(
        "XINFO",
        -2,
        &[
            subcommand("CONSUMERS", 4, Keyspace::xinfo_consumers),
            subcommand("GROUPS", 3, Keyspace::xinfo_groups),
        ],
    ),
    command("XLEN", 2, Keyspace::xlen),
    command("XPENDING", -3, Keyspace::xpending),
    command("XRANGE", -4, Keyspace::xrange),
    command("XREADGROUP", -7, Keyspace::xreadgroup),
    command("XTRIM", -4, Keyspace::xtrim),
    command("ZADD", -4, Keyspace::zadd),
    command("ZCARD", 2, Keyspace::zcard),
    command("ZRANGE", -4, Keyspace::zrange),
    command("ZRANGEBYSCORE", -4, Keyspace::zrangebyscore),
    command("ZREM", -3, Keyspace::zrem),
    command("ZREMRANGEBYSCORE", 4, Keyspace::zremrangebyscore),
];

/// Finds a command by name, ignoring ASCII case, without allocating.
fn lookup(name: &[u8]) -> Option<&'static Command> {
    let mut buf = [0u8; 24];
    let upper = buf.get_mut(..name.len())?;
    for (dst, src) in upper.iter_mut().zip(name) {
        *dst = src.to_ascii_uppercase();
    }
    let upper: &[u8] = upper;
    COMMANDS
        .binary_search_by(|c| c.name.as_bytes().cmp(upper))
        .ok()
        .map(|i| &COMMANDS[i])
}

impl Keyspace {
    /// Whether `command` (any case) is implemented.
    pub fn supports(command: &str) -> bool {
        lookup(command.as_bytes()).is_some()
    }

    /// The implemented commands, upper case.
    pub fn commands() -> impl Iterator<Item = &'static str> {
        COMMANDS.iter().map(|c| c.name)
    }

    /// The implemented subcommands of container command `command` (any case), upper case;
    /// none for other commands.
    pub fn subcommands(command: &str) -> impl Iterator<Item = &'static str> {
        let subcommands: &[Subcommand] = match lookup(command.as_bytes()).map(|c| &c.run) {
            Some(Run::Container(subcommands)) => subcommands,
            _ => &[],
        };
        subcommands.iter().map(|s| s.name)
    }

    /// Runs one command, `args[0]` being its name, with Redis 7.0 semantics. `Err` holds the
    /// error reply's text, e.g. `ERR syntax error`.
    pub fn call(&mut self, args: &[Bytes]) -> Result<Resp> {
        let Some(name) = args.first() else {
            return Err(NO_ARGUMENTS.into());
        };
        let Some(command) = lookup(name) else {
            return Err(unknown_command(name, &args[1..]));
        };
        if !arity_fits(command.arity, args.len()) {
            return Err(arity_error(command.name));
        }
        let run = match command.run {
            Run::Handler(run) => run,
            Run::Container(subcommands) => {
                // The container's arity guarantees the subcommand's name.
                let sub = subcommands
                    .iter()
                    .find(|sub| is(&args[1], sub.name))
                    .ok_or_else(|| unknown_subcommand(command.name, &args[1]))?;
                if !arity_fits(sub.arity, args.len()) {
                    return Err(arity_error(&format!("{}|{}", command.name, sub.name)));
                }
                sub.run
            }
        };
        run(self, args)
    }
}

/// Whether `argc` arguments, the name included, fit Redis's `arity`: exactly that many, or
/// at least `-arity` when it is negative.
fn arity_fits(arity: i32, argc: usize) -> bool {
    let argc = i64::try_from(argc).unwrap_or(i64::MAX);
    let arity = i64::from(arity);
    if arity < 0 {
        argc >= -arity
    } else {
        argc == arity
    }
}

/// Redis 7.0's text: `unknown command 'X', with args beginning with: 'a' 'b' `.
fn unknown_command(name: &[u8], args: &[Bytes]) -> String {
    let mut listed = String::new();
    for arg in args {
        if listed.len() >= 128 {
            break;
        }
        listed.push('\'');
        listed.extend(String::from_utf8_lossy(arg).chars().take(128));
        listed.push_str("' ");
    }
    let name: String = String::from_utf8_lossy(name).chars().take(128).collect();
    format!("ERR unknown command '{name}', with args beginning with: {listed}")
}

/// Redis 7's error for a subcommand a container command does not have.
fn unknown_subcommand(command: &str, sub: &[u8]) -> String {
    format!(
        "ERR unknown subcommand '{}'. Try {command} HELP.",
        text_128(sub)
    )
}

#[cfg(test)]
mod tests {
    use super::super::tests::{err, keyspace, ok};
    use super::*;

    #[test]
    fn command_table_is_sorted_and_complete() {
        assert!(COMMANDS.windows(2).all(|w| w[0].name < w[1].name));
        assert_eq!(COMMANDS.len(), 33);
        for command in COMMANDS {
            if let Run::Container(subcommands) = command.run {
                assert!(subcommands.windows(2).all(|w| w[0].name < w[1].name));
                assert!(
                    command.arity == -2,
                    "{}: a subcommand must follow",
                    command.name
                );
            }
        }
        for name in Keyspace::commands() {
            assert!(Keyspace::supports(name));
            assert!(Keyspace::supports(&name.to_ascii_lowercase()));
        }
        assert!(!Keyspace::supports("HINCRBYFLOAT"));
        assert!(!Keyspace::supports("EVAL"));
        assert!(!Keyspace::supports(""));
        assert!(!Keyspace::supports("ZREMRANGEBYSCOREXXXXXXXXXXXXXXXXXXX"));
        assert_eq!(
            Keyspace::subcommands("xgroup").collect::<Vec<_>>(),
            ["CREATE", "DELCONSUMER"]
        );
        assert_eq!(Keyspace::subcommands("HGET").count(), 0);
        assert_eq!(Keyspace::subcommands("NOSUCH").count(), 0);
    }

    #[test]
    fn unknown_commands_arity_and_empty_calls() {
        let (mut ks, _) = keyspace();
        assert_eq!(
            err(&mut ks, "hincrbyfloat h f 1"),
            "ERR unknown command 'hincrbyfloat', with args beginning with: 'h' 'f' '1' "
        );
        assert_eq!(
            err(&mut ks, "HGET h"),
            "ERR wrong number of arguments for 'hget' command"
        );
        assert_eq!(
            err(&mut ks, "zcard a b"),
            "ERR wrong number of arguments for 'zcard' command"
        );
        assert_eq!(
            err(&mut ks, "HSET h f v f2"),
            "ERR wrong number of arguments for 'hset' command"
        );
        assert_eq!(
            err(&mut ks, "LPOP l 1 2"),
            "ERR wrong number of arguments for 'lpop' command"
        );
        assert_eq!(ks.call(&[]), Err(NO_ARGUMENTS.to_string()));
        assert_eq!(ok(&mut ks, "hGeT missing f"), Resp::Nil);
    }
}
