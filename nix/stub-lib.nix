# A tiny stand-in for nixpkgs' `lib` (and NixOS' `utils`): just what nix/module.nix uses,
# so that nix/check.sh can evaluate the module's option declarations and the service it
# generates on a machine without nixpkgs. Not a module system: no merging, no priorities.
# `mkOption` records its arguments; every type has a `name` and a `check`.
let
  inherit (builtins)
    all
    attrNames
    attrValues
    concatLists
    concatStringsSep
    elem
    filter
    fromJSON
    isAttrs
    isBool
    isInt
    isList
    isPath
    isString
    length
    match
    replaceStrings
    stringLength
    substring
    toJSON
    ;

  mkType = name: check: { inherit name check; _type = "option-type"; };

  types = {
    bool = mkType "bool" isBool;
    str = mkType "str" isString;
    int = mkType "int" isInt;
    ints.positive = mkType "positiveInt" (x: isInt x && x > 0);
    port = mkType "port" (x: isInt x && x >= 0 && x <= 65535);
    path = mkType "path" (x: isPath x || (isString x && substring 0 1 x == "/"));
    package = mkType "package" (x: isAttrs x && (x.type or null) == "derivation");
    enum = values: mkType "enum" (x: elem x values) // { inherit values; };
    nullOr = t: mkType "nullOr" (x: x == null || t.check x) // { elemType = t; };
    listOf = t: mkType "listOf" (x: isList x && all t.check x) // { elemType = t; };
    attrsOf = t: mkType "attrsOf" (x: isAttrs x && all t.check (attrValues x)) // { elemType = t; };
  };

  hasPrefix = pre: s: substring 0 (stringLength pre) s == pre;

  escapeSystemdExecArg =
    arg:
    let
      s =
        if isPath arg then
          "${arg}"
        else if isString arg then
          arg
        else if isInt arg then
          toString arg
        else
          throw "escapeSystemdExecArg only allows strings, paths and numbers";
    in
    replaceStrings [ "%" "$" ] [ "%%" "$$" ] (toJSON s);
in
{
  inherit types hasPrefix;

  mkOption = args: args // { _type = "option"; };
  mkEnableOption = name: {
    _type = "option";
    type = types.bool;
    default = false;
    description = "Whether to enable ${name}.";
  };
  mkIf = condition: content: { _type = "if"; inherit condition content; };
  literalExpression = text: { _type = "literalExpression"; inherit text; };

  optional = c: x: if c then [ x ] else [ ];
  optionals = c: xs: if c then xs else [ ];
  optionalAttrs = c: a: if c then a else { };
  optionalString = c: s: if c then s else "";
  concatMap = f: xs: concatLists (map f xs);
  inherit attrNames concatStringsSep;
  last = xs: builtins.elemAt xs (length xs - 1);
  # Like lib.splitString for a one-character separator.
  splitString = sep: s: filter isString (builtins.split (replaceStrings [ "." "[" "]" "*" "+" "?" "(" ")" "|" "^" "$" "\\" ] [ "\\." "\\[" "\\]" "\\*" "\\+" "\\?" "\\(" "\\)" "\\|" "\\^" "\\$" "\\\\" ] sep) s);
  toInt = s: if match "[0-9]+" s != null then fromJSON s else throw "toInt: not an integer: ${s}";
  removePrefix = pre: s: if hasPrefix pre s then substring (stringLength pre) (stringLength s) s else s;

  utils = {
    inherit escapeSystemdExecArg;
    escapeSystemdExecArgs = args: concatStringsSep " " (map escapeSystemdExecArg args);
  };
}
