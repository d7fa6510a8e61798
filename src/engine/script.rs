//! The Lua scripts, compiled into the binary so both engines run exactly the shipped text.
//!
//! Redis scripts cannot share functions, so `lua/prelude.lua` holds the helpers every script
//! needs, and each script is assembled from it in one of two forms:
//!
//! - **EVAL form** ([`Script::source`]): the prelude, then `begin(KEYS, ARGV)`, then the script's
//!   own file. Both engines run it for scripts outside the shipped set (tests' probes);
//!   Redis by `EVALSHA` of its SHA-1. The prelude runs on every call.
//! - **Library form** ([`LIBRARY`]): one Redis Functions library holding every shipped
//!   script as a function, `function(KEYS, ARGV) begin(KEYS, ARGV) <file> end`, after one copy of
//!   the prelude. Loading it runs the prelude once; each call (`FCALL` in Redis, a function
//!   call in the embedded engine) runs only its function, which saves Redis about 2 µs a
//!   call and the embedded engine about 4 µs (BENCHMARKS.md).
//!
//! A file reads `KEYS` and `ARGV` as globals in the first form and as the function's
//! parameters in the second, so the same text serves both.

use std::sync::LazyLock;

/// One runnable script: the prelude plus a file of `lua/`.
#[derive(Debug)]
pub struct Script {
    name: &'static str,
    source: String,
    sha1: String,
    function: Option<String>,
}

impl Script {
    /// A script from `body` with the prelude prepended. The shipped scripts are in
    /// [`SCRIPTS`]; tests use this to run probes through both engines (in Redis by EVALSHA:
    /// a probe is not in the library).
    pub fn new(name: &'static str, body: &str) -> Script {
        let source = format!("{PRELUDE}\n{BEGIN}\n{body}");
        let sha1 = sha1_smol::Sha1::from(&source).digest().to_string();
        Script {
            name,
            source,
            sha1,
            function: None,
        }
    }

    /// The file name without `.lua`, e.g. `"claim"`.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The full text of the EVAL form.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Lowercase hex SHA-1 of [`Script::source`].
    pub fn sha1(&self) -> &str {
        &self.sha1
    }

    /// The name of this script's function in [`LIBRARY`] (what `FCALL` names), for the
    /// shipped scripts; `None` for others.
    pub fn function(&self) -> Option<&str> {
        self.function.as_deref()
    }
}

/// The shipped scripts as one Redis Functions library (`FUNCTION LOAD`).
///
/// Its name carries a hash of its text, and so do its functions' names (Redis keeps
/// function names unique across libraries): gateways of two versions sharing one Redis each
/// load and call their own library instead of replacing each other's, and a library of this
/// name, wherever found, is this very text.
#[derive(Debug)]
pub struct Library {
    name: String,
    source: String,
}

impl Library {
    /// Builds the library from `(script name, file text)` pairs.
    fn new(bodies: &[(&'static str, &'static str)]) -> Library {
        let functions = |library: &str| {
            let mut text = String::new();
            for (name, body) in bodies {
                text.push_str(&format!(
                    "redis.register_function('{library}_{name}', function(KEYS, ARGV)\n\
                     {BEGIN}\n{body}\nend)\n"
                ));
            }
            text
        };
        // Hashed with a placeholder where the name goes, since the name is the hash.
        let template = format!("{PRELUDE}\n{}", functions("kamigate"));
        let hash = sha1_smol::Sha1::from(&template).digest().to_string();
        let name = format!("kamigate_{}", &hash[..16]);
        let source = format!("#!lua name={name}\n{PRELUDE}\n{}", functions(&name));
        Library { name, source }
    }

    /// The library's name, `kamigate_<16 hex digits of its hash>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The text `FUNCTION LOAD` takes.
    pub fn source(&self) -> &str {
        &self.source
    }

    fn function(&self, script: &str) -> String {
        format!("{}_{script}", self.name)
    }
}

const PRELUDE: &str = include_str!("../../lua/prelude.lua");

/// Starts each call in either form (see `begin` in the prelude).
const BEGIN: &str = "begin(KEYS, ARGV)";

macro_rules! scripts {
    ($($field:ident),* $(,)?) => {
        /// Every script of `lua/`, by name.
        #[derive(Debug)]
        pub struct Scripts {
            $(#[doc = concat!("`lua/", stringify!($field), ".lua`")] pub $field: Script,)*
        }

        /// Every shipped script's name and file text.
        const BODIES: &[(&str, &str)] = &[
            $((
                stringify!($field),
                include_str!(concat!("../../lua/", stringify!($field), ".lua")),
            ),)*
        ];

        impl Scripts {
            fn load() -> Scripts {
                Scripts {
                    $($field: Script {
                        function: Some(LIBRARY.function(stringify!($field))),
                        ..Script::new(
                            stringify!($field),
                            include_str!(concat!("../../lua/", stringify!($field), ".lua")),
                        )
                    },)*
                }
            }

            /// All scripts, e.g. to preload them or to check the commands they use.
            pub fn all(&self) -> Vec<&Script> {
                vec![$(&self.$field),*]
            }
        }
    };
}

scripts!(
    sku,
    add,
    claim,
    claims_batch,
    confirm,
    release,
    expire,
    redeem,
    redeems_batch,
    order,
    known,
    counts,
    void,
    restore,
    index,
    window,
    exists,
    stream,
    warm,
    inspect,
    repair,
    orders,
    recode,
    pool,
    retire
);

/// The scripts, loaded once.
pub static SCRIPTS: LazyLock<Scripts> = LazyLock::new(Scripts::load);

/// The shipped scripts as one Redis Functions library, built once.
pub static LIBRARY: LazyLock<Library> = LazyLock::new(|| Library::new(BODIES));

/// The prelude's own text, for tests that scan every file of `lua/`.
pub fn prelude() -> &'static str {
    PRELUDE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_script_is_a_function_of_the_library() {
        let name = LIBRARY.name();
        assert!(LIBRARY
            .source()
            .starts_with(&format!("#!lua name={name}\n")));
        assert_eq!(name.len(), "kamigate_".len() + 16);
        for script in SCRIPTS.all() {
            let function = script.function().expect("shipped scripts are functions");
            assert_eq!(function, format!("{name}_{}", script.name()));
            assert!(
                LIBRARY
                    .source()
                    .contains(&format!("redis.register_function('{function}',")),
                "{function}"
            );
        }
        assert_eq!(Script::new("probe", "return 1").function(), None);
    }

    #[test]
    fn the_library_name_changes_with_its_text() {
        let one = Library::new(&[("a", "return 1")]);
        let other = Library::new(&[("a", "return 2")]);
        assert_ne!(one.name(), other.name());
        assert_eq!(one.name(), Library::new(&[("a", "return 1")]).name());
    }
}
