# The Vagrant lab's secrets, made on the machine that runs Vagrant before the first
# `vagrant up` (a trigger in the Vagrantfile): DIR/HOST/cluster.secret, the agents' shared
# secret, and DIR/HOST/node.keys, the node's keyring (one "PEER KEY" line per other storage
# host: one key per link, as `pairvol lab` makes them, so that no host can pose as another).
# Each VM gets its own DIR/HOST only (a synced folder of its own).  Delete DIR and provision
# again for new secrets.
require "fileutils"
require "securerandom"

module PairvolSecrets
  # Make the secrets of `hosts` under `dir`, unless every host has them already.  Under a
  # lock: libvirt brings the VMs up in parallel, and each runs the trigger.
  def self.generate(dir, hosts)
    FileUtils.mkdir_p(dir)
    File.open(File.join(dir, ".lock"), File::RDWR | File::CREAT, 0o600) do |lock|
      lock.flock(File::LOCK_EX)
      make(dir, hosts) unless hosts.all? { |h| File.exist?(File.join(dir, h, "node.keys")) }
    end
  end

  def self.make(dir, hosts)
    cluster = SecureRandom.hex(32)
    links = {}
    hosts.combination(2) { |x, y| links[[x, y].sort] = SecureRandom.hex(32) }
    hosts.each do |h|
      d = File.join(dir, h)
      FileUtils.mkdir_p(d)
      File.chmod(0o700, d)
      write(File.join(d, "cluster.secret"), "#{cluster}\n")
      lines = (hosts - [h]).map { |peer| "#{peer} #{links[[h, peer].sort]}\n" }
      write(File.join(d, "node.keys"),
            "# pairvol keyring of node #{h}: PEERNAME SECRET, one key per link\n" + lines.join)
    end
  end

  def self.write(path, text)
    tmp = "#{path}.tmp"
    File.open(tmp, File::WRONLY | File::CREAT | File::TRUNC, 0o600) { |f| f.write(text) }
    File.rename(tmp, path)
  end
end
